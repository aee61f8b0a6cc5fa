//! The worked example of `docs/protocol.md`, section 7: these exact bytes are what the code
//! produces, so the document and the implementation cannot drift apart.

use wharf_protocol::frame::{decode, encode};
use wharf_protocol::{FromWorker, ToWorker, Value};

/// `{"t": "call", "id": 1, "method": "echo", "body": "hi"}`, framed.
const CALL: &[u8] = &[
    0x00, 0x00, 0x00, 0x20, // length 32
    0x84, // map of 4
    0xa1, b't', 0xa4, b'c', b'a', b'l', b'l', // "t": "call"
    0xa2, b'i', b'd', 0x01, // "id": 1
    0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0xa4, b'e', b'c', b'h',
    b'o', // "method": "echo"
    0xa4, b'b', b'o', b'd', b'y', 0xa2, b'h', b'i', // "body": "hi"
];

/// `{"t": "ok", "id": 1, "body": "hi"}`, framed.
const REPLY: &[u8] = &[
    0x00, 0x00, 0x00, 0x12, // length 18
    0x83, // map of 3
    0xa1, b't', 0xa2, b'o', b'k', // "t": "ok"
    0xa2, b'i', b'd', 0x01, // "id": 1
    0xa4, b'b', b'o', b'd', b'y', 0xa2, b'h', b'i', // "body": "hi"
];

#[test]
fn worked_example() {
    let call = ToWorker::Call {
        id: 1,
        method: "echo".into(),
        body: Value::from("hi"),
        session: None,
        deadline_ms: None,
    };
    let reply = FromWorker::Ok {
        id: 1,
        body: Value::from("hi"),
    };
    assert_eq!(encode(&call, 1024).unwrap(), CALL);
    assert_eq!(encode(&reply, 1024).unwrap(), REPLY);
    assert_eq!(decode::<ToWorker>(&CALL[4..]).unwrap(), call);
    assert_eq!(decode::<FromWorker>(&REPLY[4..]).unwrap(), reply);
}
