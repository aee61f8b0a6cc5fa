//! Frame and message codec: every violation is typed, and nothing large is allocated for a
//! header that lies.

use std::io::Cursor;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};
use wharf_protocol::frame::{decode, encode, read_frame, FrameCodec};
use wharf_protocol::{FromWorker, MessageCodec, ProtocolError, ToWorker, Value};

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn msgpack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

#[test]
fn a_4_gib_header_is_rejected_without_allocating() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
    match codec.decode(&mut buf) {
        Err(ProtocolError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as u64);
            assert_eq!(max, wharf_protocol::DEFAULT_MAX_FRAME);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        buf.capacity() < 64 * 1024,
        "capacity grew to {}",
        buf.capacity()
    );

    // The blocking reader checks the header before allocating the payload buffer: with only
    // the header available, a 4 GiB allocation would be the only way to get further.
    let mut reader = Cursor::new(vec![0xFF, 0xFF, 0xFF, 0xFF]);
    assert!(matches!(
        read_frame(&mut reader, 1024),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

#[test]
fn zero_length_frames_are_violations() {
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(ProtocolError::EmptyFrame)
    ));
    let mut reader = Cursor::new(vec![0, 0, 0, 0]);
    assert!(matches!(
        read_frame(&mut reader, 1024),
        Err(ProtocolError::EmptyFrame)
    ));
}

#[test]
fn truncated_frames_at_eof_are_violations_and_clean_eof_is_not() {
    for bytes in [vec![0, 0], vec![0, 0, 0, 10, 1, 2, 3]] {
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            FrameCodec::default().decode_eof(&mut buf),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes), 1024),
            Err(ProtocolError::Truncated { .. })
        ));
    }
    let mut empty = BytesMut::new();
    assert!(matches!(
        FrameCodec::default().decode_eof(&mut empty),
        Ok(None)
    ));
    assert!(matches!(
        read_frame(&mut Cursor::new(vec![]), 1024),
        Ok(None)
    ));
}

#[test]
fn payloads_must_be_one_map_of_a_known_message() {
    let not_map = msgpack(&Value::Array(vec![Value::from(1)]));
    assert!(matches!(
        decode::<FromWorker>(&not_map),
        Err(ProtocolError::NotAMap { first_byte: 0x91 })
    ));
    assert!(matches!(
        decode::<FromWorker>(&[0x05]),
        Err(ProtocolError::NotAMap { .. })
    ));
    assert!(matches!(
        decode::<FromWorker>(&[0x81, 0xc1]),
        Err(ProtocolError::Malformed { .. })
    ));

    let unknown = msgpack(&map(&[("t", Value::from("bogus")), ("id", Value::from(1))]));
    match decode::<FromWorker>(&unknown) {
        Err(ProtocolError::Malformed { reason }) => assert!(reason.contains("bogus"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let no_id = msgpack(&map(&[("t", Value::from("pong"))]));
    assert!(matches!(
        decode::<FromWorker>(&no_id),
        Err(ProtocolError::Malformed { .. })
    ));

    let mut trailing = msgpack(&map(&[("t", Value::from("pong")), ("id", Value::from(1))]));
    trailing.push(0xc0);
    assert!(matches!(
        decode::<FromWorker>(&trailing),
        Err(ProtocolError::TrailingBytes { extra: 1 })
    ));
}

#[test]
fn unknown_keys_are_ignored() {
    let extra = msgpack(&map(&[
        ("t", Value::from("pong")),
        ("id", Value::from(7)),
        ("future_field", Value::from("ignored")),
    ]));
    assert_eq!(
        decode::<FromWorker>(&extra).unwrap(),
        FromWorker::Pong { id: 7 }
    );
}

#[test]
fn max_frame_is_inclusive() {
    let max = 16;
    let mut codec = FrameCodec::new(max);
    let mut at_max = BytesMut::from(&frame(&[0x80; 16])[..]);
    assert_eq!(codec.decode(&mut at_max).unwrap().unwrap().len(), 16);
    let mut over = BytesMut::from(&frame(&[0x80; 17])[..]);
    assert!(matches!(
        codec.decode(&mut over),
        Err(ProtocolError::FrameTooLarge { len: 17, max: 16 })
    ));
}

#[test]
fn encoding_over_max_frame_is_refused() {
    let big = ToWorker::Call {
        id: 1,
        method: "echo".into(),
        body: Value::Binary(vec![0; 1000]),
        session: None,
        deadline_ms: None,
    };
    assert!(matches!(
        encode(&big, 100),
        Err(ProtocolError::Encode { .. })
    ));
    let mut codec = MessageCodec::<FromWorker, ToWorker>::new(100);
    let mut dst = BytesMut::new();
    assert!(matches!(
        codec.encode(&big, &mut dst),
        Err(ProtocolError::Encode { .. })
    ));
    assert!(dst.is_empty(), "nothing half-written");
}

#[test]
fn optional_fields_are_omitted_and_read_back() {
    let call = ToWorker::Call {
        id: 3,
        method: "m".into(),
        body: Value::Nil,
        session: Some("s".into()),
        deadline_ms: Some(250),
    };
    let bytes = encode(&call, 1024).unwrap();
    assert_eq!(decode::<ToWorker>(&bytes[4..]).unwrap(), call);
    let bare = encode(&ToWorker::Shutdown { id: None }, 1024).unwrap();
    assert_eq!(
        &bare[4..],
        &msgpack(&map(&[("t", Value::from("shutdown"))]))[..]
    );
}
