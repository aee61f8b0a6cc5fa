//! The 4 GiB header costs nothing but the error: measured with a counting global allocator.
//!
//! This binary holds a single test, so no other test's allocations can disturb the measure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use wharf_protocol::frame::{read_frame, FrameCodec};
use wharf_protocol::worker::{ServeError, Worker};
use wharf_protocol::{FromWorker, MessageCodec, ProtocolError, ToWorker, DEFAULT_MAX_FRAME};

/// The system allocator, remembering the largest single request since the last reset.
struct Peak;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

/// The largest single allocation `f` made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (out, LARGEST.load(Ordering::SeqCst))
}

const SMALL: usize = 64 * 1024;
const HUGE: [u8; 4] = [0xFF, 0xFF, 0xFF, 0xFF];

#[test]
fn a_4_gib_header_allocates_nothing_large() {
    // Control: the counter does see a payload-sized allocation when a frame is honest.
    let mut honest = (1u32 << 20).to_be_bytes().to_vec();
    honest.resize(4 + (1 << 20), 0x80);
    let (frame, largest) = largest_allocation(|| read_frame(&mut &honest[..], DEFAULT_MAX_FRAME));
    assert_eq!(frame.unwrap().unwrap().len(), 1 << 20);
    assert!(
        largest >= 1 << 20,
        "the allocator counter is blind: {largest}"
    );

    let (result, largest) =
        largest_allocation(|| FrameCodec::default().decode(&mut BytesMut::from(&HUGE[..])));
    assert!(matches!(result, Err(ProtocolError::FrameTooLarge { .. })));
    assert!(largest < SMALL, "FrameCodec allocated {largest} bytes");

    let (result, largest) = largest_allocation(|| {
        MessageCodec::<FromWorker, ToWorker>::new(DEFAULT_MAX_FRAME)
            .decode_eof(&mut BytesMut::from(&HUGE[..]))
    });
    assert!(matches!(result, Err(ProtocolError::FrameTooLarge { .. })));
    assert!(largest < SMALL, "MessageCodec allocated {largest} bytes");

    let (result, largest) = largest_allocation(|| read_frame(&mut &HUGE[..], DEFAULT_MAX_FRAME));
    assert!(matches!(result, Err(ProtocolError::FrameTooLarge { .. })));
    assert!(largest < SMALL, "read_frame allocated {largest} bytes");

    // The worker SDK, reading from the runtime, refuses it the same way.
    let (result, largest) = largest_allocation(|| {
        let mut out = Vec::new();
        Worker::new()
            .method("echo", |c| Ok(c.body.clone()))
            .serve_on(Cursor::new(HUGE.to_vec()), &mut out, DEFAULT_MAX_FRAME)
    });
    assert!(matches!(
        result,
        Err(ServeError::Protocol(ProtocolError::FrameTooLarge { .. }))
    ));
    assert!(largest < SMALL, "the worker SDK allocated {largest} bytes");

    // Lengths inside a small payload lie too: str32 and bin32 announcing 4 GiB in a frame of a
    // few bytes are malformed, not an allocation. An array32 or map32 count costs at most the
    // 1 MiB serde's buffering of tagged enums preallocates (`size_hint::cautious`), never
    // count × element size; nested, that is at most MAX_DEPTH MiB of untouched reservations.
    for (lie, bound) in [
        (0xdb, SMALL),
        (0xc6, SMALL),
        (0xdd, 1 << 20),
        (0xdf, 1 << 20),
    ] {
        let payload = [
            0x82, 0xa1, b't', 0xa2, b'o', b'k', 0xa4, b'b', b'o', b'd', b'y', lie, 0xff, 0xff,
            0xff, 0xff, 0xc0,
        ];
        let (result, largest) =
            largest_allocation(|| wharf_protocol::frame::decode::<FromWorker>(&payload));
        assert!(
            matches!(result, Err(ProtocolError::Malformed { .. })),
            "{lie:#x}: {result:?}"
        );
        assert!(
            largest <= bound,
            "{lie:#x}: decode allocated {largest} bytes"
        );
    }
}
