//! Property tests: exact round trips of arbitrary messages, and arbitrary bytes never panic
//! the decoders (the fuzzing that runs on every `cargo test`).

use std::io::Cursor;

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use wharf_protocol::frame::{decode, encode, read_frame, FrameCodec};
use wharf_protocol::{FromWorker, InitStatus, MessageCodec, ToWorker, Value};

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
            .prop_map(Value::F64),
        ".{0,40}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((".{0,10}", inner), 0..8).prop_map(|kv| Value::Map(
                kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect()
            )),
        ]
    })
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        any::<u64>().prop_map(|id| ToWorker::Init { id, version: 1 }),
        (
            any::<u64>(),
            ".{0,20}",
            value(),
            proptest::option::of(".{0,20}"),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(id, method, body, session, deadline_ms)| ToWorker::Call {
                id,
                method,
                body,
                session,
                deadline_ms
            }),
        any::<u64>().prop_map(|id| ToWorker::Cancel { id }),
        any::<u64>().prop_map(|id| ToWorker::Ping { id }),
        (any::<u64>(), proptest::option::of(".{0,20}"))
            .prop_map(|(id, session)| ToWorker::Reset { id, session }),
        proptest::option::of(any::<u64>()).prop_map(|id| ToWorker::Shutdown { id }),
    ]
}

fn from_worker() -> impl Strategy<Value = FromWorker> {
    prop_oneof![
        (
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            proptest::collection::vec(".{0,10}", 0..5),
            proptest::option::of(".{0,30}")
        )
            .prop_map(|(id, ok, pid, methods, message)| FromWorker::InitPong {
                id,
                status: if ok {
                    InitStatus::Ok
                } else {
                    InitStatus::Error
                },
                version: 1,
                pid,
                methods,
                message,
            }),
        (any::<u64>(), value()).prop_map(|(id, body)| FromWorker::Ok { id, body }),
        (any::<u64>(), ".{0,20}", ".{0,40}").prop_map(|(id, kind, message)| FromWorker::Error {
            id,
            kind,
            message
        }),
        (any::<u64>(), any::<u64>(), value()).prop_map(|(id, seq, body)| FromWorker::Chunk {
            id,
            seq,
            body
        }),
        any::<u64>().prop_map(|id| FromWorker::Pong { id }),
    ]
}

const MAX: usize = 1 << 20;

proptest! {
    #[test]
    fn to_worker_round_trips(msg in to_worker(), split in any::<prop::sample::Index>()) {
        let bytes = encode(&msg, MAX).unwrap();
        prop_assert_eq!(decode::<ToWorker>(&bytes[4..]).unwrap(), msg.clone());

        // Through the codecs, with the bytes arriving in two pieces at an arbitrary point.
        let mut enc = MessageCodec::<FromWorker, ToWorker>::new(MAX);
        let mut wire = BytesMut::new();
        enc.encode(&msg, &mut wire).unwrap();
        prop_assert_eq!(&wire[..], &bytes[..]);
        let cut = split.index(wire.len() + 1);
        let mut dec = MessageCodec::<ToWorker, FromWorker>::new(MAX);
        let mut buf = BytesMut::from(&wire[..cut]);
        let first = dec.decode(&mut buf).unwrap();
        if cut < wire.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&wire[cut..]);
            prop_assert_eq!(dec.decode(&mut buf).unwrap(), Some(msg));
        } else {
            prop_assert_eq!(first, Some(msg));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn from_worker_round_trips(msg in from_worker()) {
        let bytes = encode(&msg, MAX).unwrap();
        prop_assert_eq!(decode::<FromWorker>(&bytes[4..]).unwrap(), msg.clone());
        let mut dec = MessageCodec::<FromWorker, ToWorker>::new(MAX);
        let mut buf = BytesMut::new();
        let mut got = None;
        for b in &bytes {
            buf.extend_from_slice(&[*b]);
            if let Some(m) = dec.decode(&mut buf).unwrap() {
                got = Some(m);
            }
        }
        prop_assert_eq!(got, Some(msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = FrameCodec::new(256).decode_eof(&mut buf);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = MessageCodec::<FromWorker, ToWorker>::new(256);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        let _ = codec.decode_eof(&mut buf);
        let _ = decode::<FromWorker>(&bytes);
        let _ = decode::<ToWorker>(&bytes);
        let mut reader = Cursor::new(bytes.clone());
        while let Ok(Some(_)) = read_frame(&mut reader, 256) {}
    }

    #[test]
    fn arbitrary_payloads_in_valid_frames_never_panic(payload in proptest::collection::vec(any::<u8>(), 1..256)) {
        let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&payload);
        let mut buf = BytesMut::from(&wire[..]);
        let _ = MessageCodec::<FromWorker, ToWorker>::new(MAX).decode(&mut buf);
        let _ = MessageCodec::<ToWorker, FromWorker>::new(MAX).decode(&mut BytesMut::from(&wire[..]));
    }
}
