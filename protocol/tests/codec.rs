//! Frame and message codec: every violation is typed, and nothing large is allocated for a
//! header that lies. (`alloc.rs` proves the latter with a counting allocator.)

use std::io::Read;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use wharf_protocol::frame::{decode, encode, read_frame, FrameCodec, HEADER_LEN, MAX_DEPTH};
use wharf_protocol::{FromWorker, MessageCodec, ProtocolError, ToWorker, Value, DEFAULT_MAX_FRAME};

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

fn pong(id: u64) -> Value {
    map(&[("t", Value::from("pong")), ("id", Value::from(id))])
}

/// A reader that hands out its bytes and then fails loudly if asked for more: a reader that
/// got past the header of a refused frame would be caught.
struct HeaderOnly(&'static [u8]);

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        assert!(!self.0.is_empty(), "read past the header");
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

fn decode_eof_frames(bytes: &[u8], max: usize) -> Result<Option<BytesMut>, ProtocolError> {
    FrameCodec::new(max).decode_eof(&mut BytesMut::from(bytes))
}

fn read_frame_of(bytes: &[u8], max: usize) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut reader = bytes;
    read_frame(&mut reader, max)
}

// --- Header checks ---------------------------------------------------------------------------

#[test]
fn a_4_gib_header_is_rejected_without_allocating() {
    let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
    match FrameCodec::default().decode(&mut buf) {
        Err(ProtocolError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as u64);
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        buf.capacity() < 64 * 1024,
        "capacity grew to {}",
        buf.capacity()
    );

    // The same through the message codec, and with a few payload bytes already there.
    let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF, 0x81, 0xa1][..]);
    assert!(matches!(
        MessageCodec::<FromWorker, ToWorker>::new(DEFAULT_MAX_FRAME).decode(&mut buf),
        Err(ProtocolError::FrameTooLarge {
            len: 0xFFFF_FFFF,
            ..
        })
    ));
    assert!(
        buf.capacity() < 64 * 1024,
        "capacity grew to {}",
        buf.capacity()
    );
    assert!(matches!(
        FrameCodec::default().decode_eof(&mut BytesMut::from(&[0xFF; 4][..])),
        Err(ProtocolError::FrameTooLarge { .. })
    ));

    // The blocking reader checks the header before allocating the payload buffer: with only
    // the header available, it must fail without asking for more.
    match read_frame(
        &mut HeaderOnly(&[0xFF, 0xFF, 0xFF, 0xFF]),
        DEFAULT_MAX_FRAME,
    ) {
        Err(ProtocolError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as u64);
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_length_frames_are_violations() {
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(ProtocolError::EmptyFrame)
    ));
    assert!(matches!(
        MessageCodec::<FromWorker, ToWorker>::new(1024).decode(&mut BytesMut::from(&[0u8; 4][..])),
        Err(ProtocolError::EmptyFrame)
    ));
    assert!(matches!(
        read_frame(&mut HeaderOnly(&[0, 0, 0, 0]), 1024),
        Err(ProtocolError::EmptyFrame)
    ));
    assert!(matches!(
        decode::<FromWorker>(&[]),
        Err(ProtocolError::EmptyFrame)
    ));
    assert!(matches!(
        FrameCodec::default().encode(Bytes::new(), &mut BytesMut::new()),
        Err(ProtocolError::EmptyFrame)
    ));
}

#[test]
fn a_truncated_header_at_eof_is_a_violation() {
    for got in 1..HEADER_LEN {
        let bytes = &[0, 0, 0, 1][..got];
        for result in [
            decode_eof_frames(bytes, 1024).map(|f| f.map(|b| b.to_vec())),
            read_frame_of(bytes, 1024),
        ] {
            match result {
                Err(ProtocolError::Truncated { expected, got: g }) => {
                    assert_eq!((expected, g), (4, got as u64));
                }
                other => panic!("{got} header bytes: {other:?}"),
            }
        }
        // Without EOF, the codec simply waits for more.
        let mut buf = BytesMut::from(bytes);
        assert!(FrameCodec::default().decode(&mut buf).unwrap().is_none());
    }
}

#[test]
fn a_truncated_payload_at_eof_is_a_violation() {
    let bytes = [0, 0, 0, 10, 1, 2, 3];
    for result in [
        decode_eof_frames(&bytes, 1024).map(|f| f.map(|b| b.to_vec())),
        read_frame_of(&bytes, 1024),
    ] {
        match result {
            Err(ProtocolError::Truncated { expected, got }) => {
                assert_eq!((expected, got), (14, 7));
            }
            other => panic!("{other:?}"),
        }
    }
    // A header alone, no payload at all.
    assert!(matches!(
        decode_eof_frames(&[0, 0, 0, 10], 1024),
        Err(ProtocolError::Truncated {
            expected: 14,
            got: 4
        })
    ));
    assert!(matches!(
        MessageCodec::<FromWorker, ToWorker>::new(1024).decode_eof(&mut BytesMut::from(&bytes[..])),
        Err(ProtocolError::Truncated { .. })
    ));

    // A good frame, then a truncated one: the good one comes out first.
    let mut wire = frame(&msgpack(&pong(1)));
    wire.extend_from_slice(&[0, 0, 0, 9, 0x80]);
    let mut codec = MessageCodec::<FromWorker, ToWorker>::new(1024);
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(
        codec.decode_eof(&mut buf).unwrap(),
        Some(FromWorker::Pong { id: 1 })
    );
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(ProtocolError::Truncated {
            expected: 13,
            got: 5
        })
    ));
    let mut reader = &wire[..];
    assert!(read_frame(&mut reader, 1024).unwrap().is_some());
    assert!(matches!(
        read_frame(&mut reader, 1024),
        Err(ProtocolError::Truncated {
            expected: 13,
            got: 5
        })
    ));
}

#[test]
fn eof_on_a_frame_boundary_is_a_clean_close() {
    assert!(matches!(decode_eof_frames(&[], 1024), Ok(None)));
    assert!(matches!(read_frame_of(&[], 1024), Ok(None)));
    assert!(matches!(
        MessageCodec::<FromWorker, ToWorker>::new(1024).decode_eof(&mut BytesMut::new()),
        Ok(None)
    ));

    let wire = frame(&msgpack(&pong(2)));
    let mut codec = MessageCodec::<FromWorker, ToWorker>::new(1024);
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(
        codec.decode_eof(&mut buf).unwrap(),
        Some(FromWorker::Pong { id: 2 })
    );
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    let mut reader = &wire[..];
    assert!(read_frame(&mut reader, 1024).unwrap().is_some());
    assert!(read_frame(&mut reader, 1024).unwrap().is_none());
}

#[test]
fn max_frame_is_inclusive() {
    let max = 16;
    let at_max = frame(&[0x80; 16]);
    let over = frame(&[0x80; 17]);

    let mut codec = FrameCodec::new(max);
    assert_eq!(
        codec
            .decode(&mut BytesMut::from(&at_max[..]))
            .unwrap()
            .unwrap()
            .len(),
        16
    );
    assert!(matches!(
        codec.decode(&mut BytesMut::from(&over[..])),
        Err(ProtocolError::FrameTooLarge { len: 17, max: 16 })
    ));

    assert_eq!(read_frame_of(&at_max, max).unwrap().unwrap().len(), 16);
    assert!(matches!(
        read_frame_of(&over, max),
        Err(ProtocolError::FrameTooLarge { len: 17, max: 16 })
    ));

    // The encoders draw the line in the same place.
    let mut dst = BytesMut::new();
    codec
        .encode(Bytes::from_static(&[0x80; 16]), &mut dst)
        .unwrap();
    assert_eq!(&dst[..], &at_max[..]);
    assert!(matches!(
        codec.encode(Bytes::from_static(&[0x80; 17]), &mut BytesMut::new()),
        Err(ProtocolError::FrameTooLarge { len: 17, max: 16 })
    ));
}

// --- Encoding ---------------------------------------------------------------------------------

fn call_with_body_bytes(n: usize) -> ToWorker {
    ToWorker::Call {
        id: 1,
        method: "echo".into(),
        body: Value::Binary(vec![0; n]),
        session: None,
        deadline_ms: None,
    }
}

#[test]
fn encoding_over_max_frame_is_refused() {
    let big = call_with_body_bytes(1000);
    assert!(matches!(
        encode(&big, 100),
        Err(ProtocolError::Encode { .. })
    ));
    let mut codec = MessageCodec::<FromWorker, ToWorker>::new(100);
    let mut dst = BytesMut::from(&b"earlier frame"[..]);
    match codec.encode(&big, &mut dst) {
        Err(ProtocolError::Encode { reason }) => assert!(reason.contains("max_frame"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(&dst[..], b"earlier frame", "nothing half-written");
}

/// A message whose serialization fails after part of it has been written.
struct FailsMidway;

impl serde::Serialize for FailsMidway {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("t", "ok")?;
        map.serialize_key("id")?;
        Err(S::Error::custom("cannot serialize this"))
    }
}

#[test]
fn a_failed_serialization_leaves_nothing_half_written() {
    let mut codec = MessageCodec::<FromWorker, FailsMidway>::new(1024);
    let mut dst = BytesMut::from(&b"earlier frame"[..]);
    match codec.encode(&FailsMidway, &mut dst) {
        Err(ProtocolError::Encode { reason }) => {
            assert!(reason.contains("cannot serialize this"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Before the fix the placeholder header `00 00 00 00` and the partial map stayed in the
    // buffer, and a `Framed` sink would have sent them: a zero-length frame on the wire.
    assert_eq!(&dst[..], b"earlier frame");
    assert!(matches!(
        encode(&FailsMidway, 1024),
        Err(ProtocolError::Encode { .. })
    ));
}

#[test]
fn encoding_exactly_max_frame_is_accepted() {
    let payload_len = encode(&call_with_body_bytes(100), usize::MAX)
        .unwrap()
        .len()
        - HEADER_LEN;
    let msg = call_with_body_bytes(100);
    assert_eq!(
        encode(&msg, payload_len).unwrap().len(),
        HEADER_LEN + payload_len
    );
    assert!(matches!(
        encode(&msg, payload_len - 1),
        Err(ProtocolError::Encode { .. })
    ));
    let mut dst = BytesMut::new();
    MessageCodec::<FromWorker, ToWorker>::new(payload_len)
        .encode(&msg, &mut dst)
        .unwrap();
    assert_eq!(dst.len(), HEADER_LEN + payload_len);
    assert!(MessageCodec::<FromWorker, ToWorker>::new(payload_len - 1)
        .encode(&msg, &mut BytesMut::new())
        .is_err());
    // And the reader at that max_frame takes it.
    let got: ToWorker = decode(&read_frame_of(&dst, payload_len).unwrap().unwrap()).unwrap();
    assert_eq!(got, msg);
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
    let reset = encode(
        &ToWorker::Reset {
            id: 4,
            session: None,
        },
        1024,
    )
    .unwrap();
    assert_eq!(
        &reset[4..],
        &msgpack(&map(&[("t", Value::from("reset")), ("id", Value::from(4))]))[..]
    );
}

// --- Payload checks ---------------------------------------------------------------------------

#[test]
fn payloads_that_are_not_maps_are_violations() {
    let cases: [(Vec<u8>, u8); 5] = [
        (msgpack(&Value::Array(vec![Value::from(1)])), 0x91),
        (vec![0x05], 0x05),
        (msgpack(&Value::from(-300)), 0xd1),
        (msgpack(&Value::from("t")), 0xa1),
        (vec![0xc0], 0xc0),
    ];
    for (payload, first) in cases {
        assert!(
            matches!(decode::<FromWorker>(&payload), Err(ProtocolError::NotAMap { first_byte }) if first_byte == first),
            "{payload:02x?}"
        );
        assert!(matches!(
            decode::<ToWorker>(&payload),
            Err(ProtocolError::NotAMap { .. })
        ));
        assert!(matches!(
            MessageCodec::<FromWorker, ToWorker>::new(1024)
                .decode(&mut BytesMut::from(&frame(&payload)[..])),
            Err(ProtocolError::NotAMap { .. })
        ));
    }
}

#[test]
fn invalid_messagepack_is_malformed() {
    // 0xc1 is the one byte MessagePack never uses; the others promise more than they hold.
    for payload in [
        &[0x81, 0xc1][..],
        &[0x81],
        &[0x82, 0xa1, b't'],
        &[0x81, 0xa1, b't', 0xa4, b'p', b'o'],
        &[0x81, 0xa1, b't', 0xdb, 0xff, 0xff, 0xff, 0xff],
        &[0xde, 0x00],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(
            matches!(
                decode::<FromWorker>(payload),
                Err(ProtocolError::Malformed { .. })
            ),
            "{payload:02x?}: {:?}",
            decode::<FromWorker>(payload)
        );
        assert!(matches!(
            decode::<ToWorker>(payload),
            Err(ProtocolError::Malformed { .. })
        ));
    }
}

#[test]
fn an_unknown_message_type_is_malformed_and_named() {
    let unknown = msgpack(&map(&[("t", Value::from("bogus")), ("id", Value::from(1))]));
    for result in [
        decode::<FromWorker>(&unknown).map(|_| ()),
        decode::<ToWorker>(&unknown).map(|_| ()),
    ] {
        match result {
            Err(ProtocolError::Malformed { reason }) => {
                assert!(reason.contains("bogus"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
    // A message of the other direction is unknown too.
    let ping = msgpack(&map(&[("t", Value::from("ping")), ("id", Value::from(1))]));
    assert!(matches!(
        decode::<FromWorker>(&ping),
        Err(ProtocolError::Malformed { reason }) if reason.contains("ping")
    ));
}

#[test]
fn missing_and_mistyped_fields_are_malformed() {
    let cases = [
        map(&[("t", Value::from("pong"))]),
        map(&[("id", Value::from(1))]),
        map(&[("t", Value::from("call")), ("method", Value::from("echo"))]),
        map(&[("t", Value::from("call")), ("id", Value::from(1))]),
        map(&[("t", Value::from("pong")), ("id", Value::from(-1))]),
        map(&[("t", Value::from("pong")), ("id", Value::from("1"))]),
        map(&[("t", Value::from("pong")), ("id", Value::F64(1.0))]),
        map(&[("t", Value::Nil), ("id", Value::from(1))]),
        map(&[("t", Value::from("Pong")), ("id", Value::from(1))]),
        map(&[
            ("t", Value::from("pong")),
            ("id", Value::from(1)),
            ("id", Value::from(2)),
        ]),
        map(&[
            ("t", Value::from("error")),
            ("id", Value::from(1)),
            ("kind", Value::from("x")),
        ]),
        map(&[
            ("t", Value::from("init_pong")),
            ("id", Value::from(0)),
            ("status", Value::from("maybe")),
            ("version", Value::from(1)),
            ("pid", Value::from(1)),
        ]),
        map(&[
            ("t", Value::from("init_pong")),
            ("id", Value::from(0)),
            ("status", Value::from("ok")),
            ("version", Value::from(1u64 << 32)),
            ("pid", Value::from(1)),
        ]),
    ];
    for case in cases {
        let payload = msgpack(&case);
        let to = decode::<ToWorker>(&payload);
        let from = decode::<FromWorker>(&payload);
        assert!(
            matches!(from, Err(ProtocolError::Malformed { .. })),
            "{case}: {from:?}"
        );
        assert!(
            matches!(to, Err(ProtocolError::Malformed { .. })),
            "{case}: {to:?}"
        );
    }
    match decode::<FromWorker>(&msgpack(&map(&[("t", Value::from("pong"))]))) {
        Err(ProtocolError::Malformed { reason }) => assert!(reason.contains("id"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// The spec's tags and keys are strings. serde's derived identifiers also take a variant's or
/// field's *position* as an integer, and bytes in place of a string, so these decode today:
/// `{"t": 1, "id": 5}` as `ok`, `{"t": "pong", 0: 5}` as `pong` with id 5. Kept as the
/// statement of what the spec asks for; rejecting them needs a pre-pass over the top-level map.
#[test]
#[ignore = "known leniency: integer and bin tags/keys are accepted (serde identifier indices)"]
fn non_string_tags_and_keys_are_malformed() {
    let cases = [
        map(&[("t", Value::from(1)), ("id", Value::from(5))]),
        map(&[
            ("t", Value::Binary(b"pong".to_vec())),
            ("id", Value::from(5)),
        ]),
        Value::Map(vec![
            (Value::from("t"), Value::from("pong")),
            (Value::from(0), Value::from(5)),
        ]),
        Value::Map(vec![
            (Value::Binary(b"t".to_vec()), Value::from("pong")),
            (Value::from("id"), Value::from(5)),
        ]),
    ];
    for case in cases {
        let got = decode::<FromWorker>(&msgpack(&case));
        assert!(
            matches!(got, Err(ProtocolError::Malformed { .. })),
            "{case}: {got:?}"
        );
    }
}

#[test]
fn trailing_bytes_in_a_frame_are_violations() {
    let mut trailing = msgpack(&pong(1));
    trailing.push(0xc0);
    assert!(matches!(
        decode::<FromWorker>(&trailing),
        Err(ProtocolError::TrailingBytes { extra: 1 })
    ));
    // Two whole messages in one frame.
    let mut two = msgpack(&pong(1));
    two.extend_from_slice(&msgpack(&pong(2)));
    let extra = msgpack(&pong(2)).len();
    assert!(matches!(
        MessageCodec::<FromWorker, ToWorker>::new(1024).decode(&mut BytesMut::from(&frame(&two)[..])),
        Err(ProtocolError::TrailingBytes { extra: e }) if e == extra
    ));
}

// --- Forward compatibility and leniency the spec grants ---------------------------------------

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

    // Unknown keys of every type, nested ones included, before, between and after known keys.
    let nested = Value::Array(vec![
        map(&[
            ("t", Value::from("bogus")),
            ("x", Value::Binary(vec![1, 2])),
        ]),
        Value::F64(1.5),
        Value::from(u64::MAX),
        Value::Ext(1, vec![0; 4]),
    ]);
    let call = msgpack(&map(&[
        ("priority", nested.clone()),
        ("t", Value::from("call")),
        ("trace", map(&[("span", Value::from(-5)), ("tags", nested)])),
        ("id", Value::from(9)),
        ("method", Value::from("echo")),
        ("x", Value::Nil),
        ("body", Value::from("hi")),
        ("y", Value::Binary(vec![0; 300])),
    ]));
    assert_eq!(
        decode::<ToWorker>(&call).unwrap(),
        ToWorker::Call {
            id: 9,
            method: "echo".into(),
            body: Value::from("hi"),
            session: None,
            deadline_ms: None
        }
    );
}

#[test]
fn keys_may_come_in_any_order() {
    let payload = msgpack(&map(&[
        ("body", Value::from(1)),
        ("seq", Value::from(3)),
        ("id", Value::from(2)),
        ("t", Value::from("chunk")),
    ]));
    assert_eq!(
        decode::<FromWorker>(&payload).unwrap(),
        FromWorker::Chunk {
            id: 2,
            seq: 3,
            body: Value::from(1)
        }
    );
}

#[test]
fn absent_and_nil_optional_fields_read_alike() {
    let with_nils = msgpack(&map(&[
        ("t", Value::from("call")),
        ("id", Value::from(1)),
        ("method", Value::from("m")),
        ("body", Value::Nil),
        ("session", Value::Nil),
        ("deadline_ms", Value::Nil),
    ]));
    let bare = msgpack(&map(&[
        ("t", Value::from("call")),
        ("id", Value::from(1)),
        ("method", Value::from("m")),
    ]));
    let want = ToWorker::Call {
        id: 1,
        method: "m".into(),
        body: Value::Nil,
        session: None,
        deadline_ms: None,
    };
    assert_eq!(decode::<ToWorker>(&with_nils).unwrap(), want);
    assert_eq!(decode::<ToWorker>(&bare).unwrap(), want);

    let shutdown = msgpack(&map(&[("t", Value::from("shutdown")), ("id", Value::Nil)]));
    assert_eq!(
        decode::<ToWorker>(&shutdown).unwrap(),
        ToWorker::Shutdown { id: None }
    );
    let pong = msgpack(&map(&[
        ("t", Value::from("init_pong")),
        ("id", Value::from(0)),
        ("status", Value::from("error")),
        ("version", Value::from(1)),
        ("pid", Value::from(42)),
        ("message", Value::Nil),
    ]));
    assert_eq!(
        decode::<FromWorker>(&pong).unwrap(),
        FromWorker::InitPong {
            id: 0,
            status: wharf_protocol::InitStatus::Error,
            version: 1,
            pid: 42,
            methods: vec![],
            message: None,
            max_concurrency: None,
        }
    );
}

#[test]
fn any_map_and_integer_encoding_is_accepted() {
    // map16 and map32 headers, and ids in wider encodings than needed: other languages'
    // encoders are free to choose them.
    let body = [
        0xa1, b't', 0xa4, b'p', b'o', b'n', b'g', // "t": "pong"
        0xa2, b'i', b'd', // "id":
    ];
    for (map_header, id) in [
        (&[0x82][..], &[0xcc, 0x07][..]),
        (&[0xde, 0x00, 0x02], &[0xcd, 0x00, 0x07]),
        (&[0xdf, 0x00, 0x00, 0x00, 0x02], &[0xce, 0, 0, 0, 7]),
        (&[0x82], &[0xcf, 0, 0, 0, 0, 0, 0, 0, 7]),
        (&[0x82], &[0xd3, 0, 0, 0, 0, 0, 0, 0, 7]),
        (&[0x82], &[0xd0, 0x07]),
    ] {
        let payload = [map_header, &body[..], id].concat();
        assert_eq!(
            decode::<FromWorker>(&payload).unwrap(),
            FromWorker::Pong { id: 7 },
            "{payload:02x?}"
        );
    }
}

#[test]
fn nesting_is_limited_to_max_depth() {
    // `{"t": "ok", "id": 1, "body": [[[...nil...]]]}` with `levels` containers, the map included.
    let payload = |levels: usize| {
        let mut p = vec![
            0x83, 0xa1, b't', 0xa2, b'o', b'k', 0xa2, b'i', b'd', 0x01, 0xa4, b'b', b'o', b'd',
            b'y',
        ];
        p.extend(std::iter::repeat_n(0x91, levels - 1));
        p.push(0xc0);
        p
    };
    // Decoding runs on a 2 MiB stack, as on a tokio worker thread; before the limit, a 600-byte
    // frame of nested arrays overflowed it and aborted the process.
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let ok: FromWorker = decode(&payload(MAX_DEPTH)).unwrap();
            let FromWorker::Ok { body, .. } = ok else {
                panic!("{ok:?}")
            };
            let mut depth = 1;
            let mut v = &body;
            while let Value::Array(a) = v {
                depth += 1;
                v = &a[0];
            }
            assert_eq!(depth, MAX_DEPTH);
            for levels in [MAX_DEPTH + 1, 1_000, 100_000] {
                match decode::<FromWorker>(&payload(levels)) {
                    Err(ProtocolError::Malformed { reason }) => {
                        assert!(reason.contains("depth"), "{reason}")
                    }
                    other => panic!("{levels}: {other:?}"),
                }
            }
            // The same with `t` last, which makes serde buffer the whole map first.
            let mut late_t = vec![0x83, 0xa2, b'i', b'd', 0x01, 0xa4, b'b', b'o', b'd', b'y'];
            late_t.extend(std::iter::repeat_n(0x91, 100_000));
            late_t.push(0xc0);
            late_t.extend_from_slice(&[0xa1, b't', 0xa2, b'o', b'k']);
            assert!(matches!(
                decode::<FromWorker>(&late_t),
                Err(ProtocolError::Malformed { .. })
            ));
            let mut maps = vec![0x82, 0xa1, b't', 0xa4, b'p', b'o', b'n', b'g', 0xa1, b'x'];
            for _ in 0..100_000 {
                maps.extend_from_slice(&[0x81, 0xa1, b'x']);
            }
            maps.push(0xc0);
            assert!(matches!(
                decode::<FromWorker>(&maps),
                Err(ProtocolError::Malformed { .. })
            ));
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn violations_are_violations_and_io_is_not() {
    assert!(ProtocolError::EmptyFrame.is_violation());
    assert!(ProtocolError::FrameTooLarge { len: 1, max: 0 }.is_violation());
    let io = ProtocolError::from(std::io::Error::other("pipe"));
    assert!(!io.is_violation());

    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken pipe"))
        }
    }
    assert!(matches!(
        read_frame(&mut Broken, 1024),
        Err(ProtocolError::Io(_))
    ));
}

/// `body` is required in a worker's `ok` and `chunk` (a reset's `ok` carries nil): a reply
/// without one is a violation, not a nil result.
#[test]
fn ok_and_chunk_without_a_body_are_malformed() {
    let cases = [
        map(&[("t", Value::from("ok")), ("id", Value::from(1))]),
        map(&[
            ("t", Value::from("chunk")),
            ("id", Value::from(1)),
            ("seq", Value::from(0)),
        ]),
    ];
    for case in cases {
        match decode::<FromWorker>(&msgpack(&case)) {
            Err(ProtocolError::Malformed { reason }) => {
                assert!(reason.contains("body"), "{case}: {reason}")
            }
            other => panic!("{case}: {other:?}"),
        }
    }
    let nil_body = map(&[
        ("t", Value::from("ok")),
        ("id", Value::from(1)),
        ("body", Value::Nil),
    ]);
    assert_eq!(
        decode::<FromWorker>(&msgpack(&nil_body)).unwrap(),
        FromWorker::Ok {
            id: 1,
            body: Value::Nil
        }
    );
}
