//! Property tests: exact round trips of arbitrary messages through every encoder and decoder,
//! in one piece, split anywhere and byte by byte; and arbitrary bytes never panic the decoders
//! (the fuzzing that runs on every `cargo test`).

use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};
use wharf_protocol::frame::{decode, encode, read_frame, FrameCodec, HEADER_LEN};
use wharf_protocol::worker::Worker;
use wharf_protocol::{
    FromWorker, InitStatus, MessageCodec, ProtocolError, ToWorker, Value, DEFAULT_MAX_FRAME,
};

const MAX: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Every edge between MessagePack integer widths, both sides of it.
const INT_EDGES: &[i128] = &[
    0,
    1,
    127,
    128,
    255,
    256,
    65_535,
    65_536,
    4_294_967_295,
    4_294_967_296,
    i64::MAX as i128,
    i64::MAX as i128 + 1,
    u64::MAX as i128,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32_768,
    -32_769,
    i32::MIN as i128,
    i32::MIN as i128 - 1,
    i64::MIN as i128,
];

fn int_value(n: i128) -> Value {
    if n < 0 {
        Value::from(n as i64)
    } else {
        Value::from(n as u64)
    }
}

/// Integers over the whole i64 and u64 range, with every encoding width well represented.
fn int() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-40i64..300).prop_map(Value::from),
        any::<i16>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        prop::sample::select(INT_EDGES).prop_map(int_value),
    ]
}

/// Request ids: anywhere in u64, edges included.
fn id() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        prop::sample::select(INT_EDGES)
            .prop_filter("ids are unsigned", |n| *n >= 0)
            .prop_map(|n| n as u64),
    ]
}

/// Strings: usually short, sometimes long enough for str8 / str16; any char, newlines included.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![4 => "(?s).{0,40}", 1 => "(?s).{0,300}"]
}

/// Any MessagePack value of the spec's `any` (nil, bool, int, float, str, bin, array, map with
/// string keys), of bounded depth and size. Floats include NaN, infinities and -0.0: they are
/// compared bit for bit.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        int(),
        int(),
        any::<f64>().prop_map(Value::F64),
        any::<f32>().prop_map(Value::F32),
        string().prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(("(?s).{0,10}", inner), 0..8).prop_map(|kv| Value::Map(
                kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect()
            )),
        ]
    })
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        (id(), any::<u32>()).prop_map(|(id, version)| ToWorker::Init { id, version }),
        (
            id(),
            string(),
            value(),
            prop::option::of(string()),
            prop::option::of(id())
        )
            .prop_map(|(id, method, body, session, deadline_ms)| ToWorker::Call {
                id,
                method,
                body,
                session,
                deadline_ms
            }),
        id().prop_map(|id| ToWorker::Cancel { id }),
        id().prop_map(|id| ToWorker::Ping { id }),
        (id(), prop::option::of(string()))
            .prop_map(|(id, session)| ToWorker::Reset { id, session }),
        prop::option::of(id()).prop_map(|id| ToWorker::Shutdown { id }),
    ]
}

fn from_worker() -> impl Strategy<Value = FromWorker> {
    prop_oneof![
        (
            id(),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(string(), 0..5),
            prop::option::of(string())
        )
            .prop_map(
                |(id, ok, version, pid, methods, message)| FromWorker::InitPong {
                    id,
                    status: if ok {
                        InitStatus::Ok
                    } else {
                        InitStatus::Error
                    },
                    version,
                    pid,
                    methods,
                    message,
                    max_concurrency: None,
                }
            ),
        (id(), value()).prop_map(|(id, body)| FromWorker::Ok { id, body }),
        (id(), string(), string()).prop_map(|(id, kind, message)| FromWorker::Error {
            id,
            kind,
            message
        }),
        (id(), id(), value()).prop_map(|(id, seq, body)| FromWorker::Chunk { id, seq, body }),
        id().prop_map(|id| FromWorker::Pong { id }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Bitwise equality (NaN == NaN, 0.0 != -0.0)
// ---------------------------------------------------------------------------------------------

fn bits_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| bits_eq(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| bits_eq(ka, kb) && bits_eq(va, vb))
        }
        (a, b) => a == b,
    }
}

/// Two messages are the same, floats compared bit for bit.
fn same<M: Serialize>(a: &M, b: &M) -> bool {
    bits_eq(
        &rmpv::ext::to_value(a).unwrap(),
        &rmpv::ext::to_value(b).unwrap(),
    )
}

fn assert_same<M: Serialize + Debug>(got: &M, want: &M) -> Result<(), TestCaseError> {
    prop_assert!(same(got, want), "got {:?}\nwant {:?}", got, want);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/// Feeds `wire` to `codec` in the pieces `cuts` delimit, then signals EOF; returns every message.
fn decode_in_pieces<D>(codec: &mut D, wire: &[u8], cuts: &[usize]) -> Vec<D::Item>
where
    D: Decoder,
    D::Error: Debug,
{
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.push(wire.len());
    cuts.sort_unstable();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut from = 0;
    for to in cuts {
        buf.extend_from_slice(&wire[from..to]);
        from = to;
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            got.push(item);
        }
    }
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    got
}

/// One message through every path: `encode`/`decode`, `MessageCodec` (whole, split at `cuts`,
/// byte by byte), `FrameCodec` and `read_frame`.
fn round_trip<M, Other>(msg: &M, cuts: &[usize]) -> Result<(), TestCaseError>
where
    M: Serialize + DeserializeOwned + Debug,
{
    let bytes = encode(msg, MAX).unwrap();
    let n = u32::from_be_bytes(bytes[..HEADER_LEN].try_into().unwrap()) as usize;
    prop_assert_eq!(n, bytes.len() - HEADER_LEN);
    let payload = &bytes[HEADER_LEN..];
    assert_same(&decode::<M>(payload).unwrap(), msg)?;

    // The tokio-util encoder writes exactly what `encode` does, after anything already there.
    let mut enc = MessageCodec::<Other, M>::new(MAX);
    let mut wire = BytesMut::from(&b"xy"[..]);
    enc.encode(msg, &mut wire).unwrap();
    prop_assert_eq!(&wire[..2], b"xy");
    prop_assert_eq!(&wire[2..], &bytes[..]);

    // Decoder: whole, split at arbitrary points, byte by byte.
    let mut dec = MessageCodec::<M, Other>::new(MAX);
    let mut whole = BytesMut::from(&bytes[..]);
    assert_same(&dec.decode(&mut whole).unwrap().unwrap(), msg)?;
    prop_assert!(whole.is_empty());
    prop_assert!(dec.decode(&mut whole).unwrap().is_none());

    let got = decode_in_pieces(&mut dec, &bytes, cuts);
    prop_assert_eq!(got.len(), 1);
    assert_same(&got[0], msg)?;

    let mut buf = BytesMut::new();
    for (i, b) in bytes.iter().enumerate() {
        buf.extend_from_slice(&[*b]);
        match dec.decode(&mut buf).unwrap() {
            Some(got) => {
                prop_assert_eq!(i, bytes.len() - 1, "a message before its last byte");
                assert_same(&got, msg)?;
            }
            None => prop_assert!(i < bytes.len() - 1, "no message after the last byte"),
        }
    }
    prop_assert!(buf.is_empty());

    // Raw frames.
    let mut frames = FrameCodec::new(MAX);
    let mut buf = BytesMut::from(&bytes[..]);
    prop_assert_eq!(&frames.decode(&mut buf).unwrap().unwrap()[..], payload);
    let mut reframed = BytesMut::new();
    frames
        .encode(Bytes::copy_from_slice(payload), &mut reframed)
        .unwrap();
    prop_assert_eq!(&reframed[..], &bytes[..]);
    let mut reader: &[u8] = &bytes;
    prop_assert_eq!(read_frame(&mut reader, MAX).unwrap().unwrap(), payload);
    prop_assert!(read_frame(&mut reader, MAX).unwrap().is_none());
    Ok(())
}

/// Several messages back to back, arriving in arbitrary pieces.
fn stream_round_trip<M, Other>(msgs: &[M], cuts: &[usize]) -> Result<(), TestCaseError>
where
    M: Serialize + DeserializeOwned + Debug,
{
    let wire: Vec<u8> = msgs.iter().flat_map(|m| encode(m, MAX).unwrap()).collect();
    let got = decode_in_pieces(&mut MessageCodec::<M, Other>::new(MAX), &wire, cuts);
    prop_assert_eq!(got.len(), msgs.len());
    for (g, m) in got.iter().zip(msgs) {
        assert_same(g, m)?;
    }
    let mut reader: &[u8] = &wire;
    for m in msgs {
        let payload = read_frame(&mut reader, MAX).unwrap().unwrap();
        assert_same(&decode::<M>(&payload).unwrap(), m)?;
    }
    prop_assert!(read_frame(&mut reader, MAX).unwrap().is_none());
    Ok(())
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..6)
}

fn has_nan(v: &Value) -> bool {
    match v {
        Value::F64(f) => f.is_nan(),
        Value::F32(f) => f.is_nan(),
        Value::Array(a) => a.iter().any(has_nan),
        Value::Map(m) => m.iter().any(|(k, v)| has_nan(k) || has_nan(v)),
        _ => false,
    }
}

proptest! {
    #[test]
    fn to_worker_round_trips(msg in to_worker(), cuts in cuts()) {
        round_trip::<ToWorker, FromWorker>(&msg, &cuts)?;
    }

    #[test]
    fn from_worker_round_trips(msg in from_worker(), cuts in cuts()) {
        round_trip::<FromWorker, ToWorker>(&msg, &cuts)?;
    }

    #[test]
    fn to_worker_streams_round_trip(
        msgs in prop::collection::vec(to_worker(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        stream_round_trip::<ToWorker, FromWorker>(&msgs, &cuts)?;
    }

    #[test]
    fn from_worker_streams_round_trip(
        msgs in prop::collection::vec(from_worker(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        stream_round_trip::<FromWorker, ToWorker>(&msgs, &cuts)?;
    }

    /// Without NaN the derived `PartialEq` agrees with the bitwise comparison used above.
    #[test]
    fn round_trips_are_plain_equal_without_nan(body in value()) {
        prop_assume!(!has_nan(&body));
        let msg = FromWorker::Ok { id: 1, body };
        prop_assert_eq!(decode::<FromWorker>(&encode(&msg, MAX).unwrap()[HEADER_LEN..]).unwrap(), msg);
    }

    /// The SDK's echo returns any body unchanged.
    #[test]
    fn the_sdk_echoes_any_body(id in id(), body in value()) {
        let call = ToWorker::Call { id, method: "echo".into(), body: body.clone(), session: None, deadline_ms: None };
        let mut out = Vec::new();
        Worker::new()
            .method("echo", |c| Ok(c.body.clone()))
            .serve_on(&encode(&call, MAX).unwrap()[..], &mut out, MAX)
            .unwrap();
        let mut reader: &[u8] = &out;
        let reply: FromWorker = decode(&read_frame(&mut reader, MAX).unwrap().unwrap()).unwrap();
        assert_same(&reply, &FromWorker::Ok { id, body })?;
        prop_assert!(reader.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Decoders never panic
// ---------------------------------------------------------------------------------------------

fn check_violation(e: ProtocolError) -> Result<(), TestCaseError> {
    prop_assert!(e.is_violation(), "in-memory input gave {:?}", e);
    Ok(())
}

/// Runs a decoder over `bytes` until it stops, then `decode_eof`; checks that errors are typed
/// violations and that the buffer never grew past one maximal frame.
fn drain<D>(mut codec: D, bytes: &[u8], max_frame: usize) -> Result<(), TestCaseError>
where
    D: Decoder<Error = ProtocolError>,
{
    let mut buf = BytesMut::from(bytes);
    let bound = 2 * bytes.len().max(HEADER_LEN + max_frame);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return check_violation(e),
        }
    }
    prop_assert!(
        buf.capacity() <= bound,
        "capacity {} > {}",
        buf.capacity(),
        bound
    );
    match codec.decode_eof(&mut buf) {
        Ok(_) => {}
        Err(e) => check_violation(e)?,
    }
    Ok(())
}

/// Everything that reads bytes, over `bytes`.
fn never_panics(bytes: &[u8]) -> Result<(), TestCaseError> {
    for max in [64, 256, DEFAULT_MAX_FRAME] {
        drain(FrameCodec::new(max), bytes, max)?;
        drain(MessageCodec::<FromWorker, ToWorker>::new(max), bytes, max)?;
        drain(MessageCodec::<ToWorker, FromWorker>::new(max), bytes, max)?;
        let mut reader: &[u8] = bytes;
        loop {
            match read_frame(&mut reader, max) {
                Ok(Some(payload)) => {
                    prop_assert!(!payload.is_empty() && payload.len() <= max);
                    if let Err(e) = decode::<FromWorker>(&payload) {
                        check_violation(e)?;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    check_violation(e)?;
                    break;
                }
            }
        }
    }
    if let Err(e) = decode::<FromWorker>(bytes) {
        check_violation(e)?;
    }
    if let Err(e) = decode::<ToWorker>(bytes) {
        check_violation(e)?;
    }
    Ok(())
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(payload);
    wire
}

const TAGS: &[&str] = &[
    "init",
    "call",
    "cancel",
    "ping",
    "reset",
    "shutdown",
    "init_pong",
    "ok",
    "error",
    "chunk",
    "pong",
    "bogus",
];
const FIELDS: &[&str] = &[
    "id",
    "version",
    "method",
    "body",
    "session",
    "deadline_ms",
    "status",
    "pid",
    "methods",
    "message",
    "kind",
    "seq",
    "extra",
];

/// Maps that look like messages: a known (or bogus) `t` and known fields with values of any type.
fn message_like() -> impl Strategy<Value = Value> {
    let field_value = prop_oneof![
        4 => id().prop_map(Value::from),
        2 => string().prop_map(Value::from),
        1 => Just(Value::Nil),
        1 => prop::sample::select(&["ok", "error"][..]).prop_map(Value::from),
        1 => prop::collection::vec(string().prop_map(Value::from), 0..3).prop_map(Value::Array),
        2 => value(),
    ];
    (
        prop::option::weighted(0.9, prop::sample::select(TAGS)),
        prop::option::weighted(0.8, id()),
        prop::collection::vec((prop::sample::select(FIELDS), field_value), 0..6),
        any::<Index>(),
    )
        .prop_map(|(t, id, fields, at)| {
            let mut pairs: Vec<(Value, Value)> = id
                .map(|id| (Value::from("id"), Value::from(id)))
                .into_iter()
                .chain(fields.into_iter().map(|(k, v)| (Value::from(k), v)))
                .collect();
            if let Some(t) = t {
                let at = at.index(pairs.len() + 1);
                pairs.insert(at, (Value::from("t"), Value::from(t)));
            }
            Value::Map(pairs)
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        never_panics(&bytes)?;
    }

    #[test]
    fn arbitrary_payloads_in_valid_frames_never_panic(
        payload in prop::collection::vec(any::<u8>(), 1..256),
    ) {
        never_panics(&framed(&payload))?;
        never_panics(&payload)?;
    }

    /// Maps shaped like messages exercise the typed decoding rather than the framing. Whatever
    /// decodes re-encodes and decodes to the same message.
    #[test]
    fn message_like_maps_never_panic(map in message_like()) {
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &map).unwrap();
        never_panics(&framed(&payload))?;
        if let Ok(msg) = decode::<ToWorker>(&payload) {
            assert_same(&decode::<ToWorker>(&encode(&msg, MAX).unwrap()[HEADER_LEN..]).unwrap(), &msg)?;
        }
        if let Ok(msg) = decode::<FromWorker>(&payload) {
            assert_same(&decode::<FromWorker>(&encode(&msg, MAX).unwrap()[HEADER_LEN..]).unwrap(), &msg)?;
        }
    }

    /// Valid frames with a few bytes overwritten, inserted or removed.
    #[test]
    fn mutated_frames_never_panic(
        msg in from_worker(),
        edits in prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = encode(&msg, MAX).unwrap();
        for (at, byte, op) in edits {
            match op {
                0 if !bytes.is_empty() => {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                1 => {
                    let i = at.index(bytes.len() + 1);
                    bytes.insert(i, byte);
                }
                _ if !bytes.is_empty() => {
                    let i = at.index(bytes.len());
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        never_panics(&bytes)?;
        if bytes.len() > HEADER_LEN {
            // The same payload under a header that matches its length.
            never_panics(&framed(&bytes[HEADER_LEN..]))?;
        }
    }
}
