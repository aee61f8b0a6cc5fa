//! The worked example of `docs/protocol.md`, section 7: these exact bytes are what the code
//! produces, and the hex dumps in the document are these bytes, annotated correctly, so the
//! document and the implementation cannot drift apart.

use wharf_protocol::frame::{decode, encode, HEADER_LEN};
use wharf_protocol::{FromWorker, ToWorker, Value};

/// `{"t": "call", "id": 1, "method": "echo", "body": "hi"}`, framed.
const CALL: &[u8] = &[
    0x00, 0x00, 0x00, 0x20, // length 32
    0x84, // fixmap, 4 entries
    0xa1, b't', 0xa4, b'c', b'a', b'l', b'l', // "t": "call"
    0xa2, b'i', b'd', 0x01, // "id": 1
    0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0xa4, b'e', b'c', b'h',
    b'o', // "method": "echo"
    0xa4, b'b', b'o', b'd', b'y', 0xa2, b'h', b'i', // "body": "hi"
];

/// `{"t": "ok", "id": 1, "body": "hi"}`, framed.
const REPLY: &[u8] = &[
    0x00, 0x00, 0x00, 0x12, // length 18
    0x83, // fixmap, 3 entries
    0xa1, b't', 0xa2, b'o', b'k', // "t": "ok"
    0xa2, b'i', b'd', 0x01, // "id": 1
    0xa4, b'b', b'o', b'd', b'y', 0xa2, b'h', b'i', // "body": "hi"
];

const SPEC: &str = include_str!("../../docs/protocol.md");

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
    assert_eq!(decode::<ToWorker>(&CALL[HEADER_LEN..]).unwrap(), call);
    assert_eq!(decode::<FromWorker>(&REPLY[HEADER_LEN..]).unwrap(), reply);

    let dumps = hex_dumps(section_7());
    assert_eq!(dumps.len(), 2, "section 7 should hold two hex dumps");
    for (dump, want) in dumps.iter().zip([CALL, REPLY]) {
        assert_eq!(dump.bytes, want, "docs/protocol.md disagrees with the code");
        assert_eq!(dump.announced, Some(want.len()), "byte count in the prose");
    }
}

/// Section 7 of the spec, up to the next section.
fn section_7() -> &'static str {
    let start = SPEC
        .find("\n## 7.")
        .expect("docs/protocol.md has no section 7");
    let rest = &SPEC[start + 1..];
    match rest[1..].find("\n## ") {
        Some(end) => &rest[..end + 1],
        None => rest,
    }
}

struct Dump {
    /// The dump's bytes, in order.
    bytes: Vec<u8>,
    /// "..., N bytes:" in the line before the block.
    announced: Option<usize>,
}

/// Every fenced block of hex bytes in `text`; each line's annotation is checked against its
/// bytes on the way.
fn hex_dumps(text: &str) -> Vec<Dump> {
    let mut dumps = Vec::new();
    let mut prose_before = "";
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") {
            if !line.trim().is_empty() {
                prose_before = line;
            }
            continue;
        }
        let mut bytes = Vec::new();
        for line in lines.by_ref().take_while(|l| !l.starts_with("```")) {
            let (line_bytes, note) = split_hex(line);
            if !line_bytes.is_empty() {
                check_annotation(&line_bytes, note, line);
                bytes.extend_from_slice(&line_bytes);
            }
        }
        if bytes.is_empty() {
            continue;
        }
        if bytes.len() >= HEADER_LEN {
            let n = u32::from_be_bytes(bytes[..HEADER_LEN].try_into().unwrap()) as usize;
            assert_eq!(n, bytes.len() - HEADER_LEN, "header vs. dump length");
        }
        let announced = prose_before
            .strip_suffix(" bytes:")
            .and_then(|p| p.rsplit(' ').next())
            .and_then(|n| n.parse().ok());
        dumps.push(Dump { bytes, announced });
    }
    dumps
}

/// The leading two-digit hex tokens of a line, and the annotation after them.
fn split_hex(line: &str) -> (Vec<u8>, &str) {
    let mut bytes = Vec::new();
    let mut rest = line.trim_start();
    while let Some(token) = rest.split_whitespace().next() {
        match (token.len(), u8::from_str_radix(token, 16)) {
            (2, Ok(b)) => {
                bytes.push(b);
                rest = rest[2..].trim_start();
            }
            _ => break,
        }
    }
    (bytes, rest.trim())
}

/// The annotation says what the bytes are: a length header, a fixmap, a fixstr or a positive
/// fixint, with the right numbers and text.
fn check_annotation(bytes: &[u8], note: &str, line: &str) {
    if let Some(n) = note
        .strip_prefix("length: ")
        .and_then(|r| r.strip_suffix(" payload bytes"))
    {
        let n: u32 = n.parse().unwrap();
        assert_eq!(bytes, n.to_be_bytes(), "{line}");
    } else if let Some(n) = note
        .strip_prefix("fixmap, ")
        .and_then(|r| r.strip_suffix(" entries"))
    {
        let n: u8 = n.parse().unwrap();
        assert!(n < 16, "{line}");
        assert_eq!(bytes, [0x80 | n], "{line}");
    } else if let Some(r) = note.strip_prefix("fixstr(") {
        let (n, s) = r.split_once(") ").unwrap();
        let n: u8 = n.parse().unwrap();
        let s = s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap();
        assert!(n < 32 && s.len() == n as usize, "{line}");
        assert_eq!(bytes[0], 0xa0 | n, "{line}");
        assert_eq!(&bytes[1..], s.as_bytes(), "{line}");
    } else if let Some(n) = note.strip_prefix("positive fixint ") {
        let n: u8 = n.parse().unwrap();
        assert!(n < 128, "{line}");
        assert_eq!(bytes, [n], "{line}");
    } else {
        panic!("unchecked annotation in docs/protocol.md: {line}");
    }
}
