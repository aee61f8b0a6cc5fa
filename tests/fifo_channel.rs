//! Both SDKs' container channel modes on this machine, without Docker: the Rust example worker
//! and the Python demo over FIFOs, made and opened as the runtime makes and opens them (its
//! ends first, and the far ends held until the worker's first byte), and over a unix socket. A
//! handshake, a body over a MiB, a cancel seen while a call runs, EOF → exit 0; and a worker
//! whose reply FIFO nobody reads exits non-zero at once instead of waiting.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wharf_protocol::frame::{decode, encode, read_frame};
use wharf_protocol::{FromWorker, InitStatus, ToWorker, Value, DEFAULT_MAX_FRAME};

const WAIT: Duration = Duration::from_secs(15);

/// The two workers under test: the Rust example and the Python demo.
fn workers() -> [(&'static str, Command); 2] {
    let rust = Command::new(env!("CARGO_BIN_EXE_wharf-example-worker"));
    let mut python = Command::new("python3");
    python
        .args(["-m", "wharf_worker.demo"])
        .env("PYTHONPATH", common::python_path());
    [("rust", rust), ("python", python)]
}

/// A fresh directory holding the FIFO pair `in` and `out`.
fn fifo_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wharf-fifo-sdk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for fifo in ["in", "out"] {
        nix::unistd::mkfifo(&dir.join(fifo), nix::sys::stat::Mode::S_IRWXU).unwrap();
    }
    dir
}

fn open(path: &Path, write: bool) -> File {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

/// The runtime's side: requests to the worker, its messages from a reader thread (so every
/// wait has a deadline), and the worker.
struct Runtime {
    to_worker: Option<Box<dyn Write>>,
    from_worker: mpsc::Receiver<Option<FromWorker>>,
    child: Child,
    dir: PathBuf,
}

impl Runtime {
    /// The worker on a FIFO pair.
    fn over_fifos(name: &str, mut cmd: Command) -> Runtime {
        let dir = fifo_dir(name);
        // As the runtime does: a keeper reader, then the writer; the reader, then a keeper
        // writer. Nothing blocks, and the worker's opens find their other ends.
        let keep_in = open(&dir.join("in"), false);
        let to_worker = open(&dir.join("in"), true);
        let from_worker = open(&dir.join("out"), false);
        let keep_out = open(&dir.join("out"), true);
        set_blocking(&to_worker);
        set_blocking(&from_worker);
        let child = cmd
            .env("WHARF_CHANNEL", "fifo")
            .env("WHARF_FIFO_IN", dir.join("in"))
            .env("WHARF_FIFO_OUT", dir.join("out"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let input = FirstByte {
            file: from_worker,
            keepers: Some((keep_in, keep_out)),
        };
        Runtime {
            to_worker: Some(Box::new(to_worker)),
            from_worker: messages(input),
            child,
            dir,
        }
    }

    /// The worker on a unix socket it connects to.
    fn over_a_socket(name: &str, mut cmd: Command) -> Runtime {
        let dir =
            std::env::temp_dir().join(format!("wharf-sock-sdk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let child = cmd
            .env("WHARF_CHANNEL", "socket")
            .env("WHARF_SOCKET", dir.join("s"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(started.elapsed() < WAIT, "the worker did not connect");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        Runtime {
            to_worker: Some(Box::new(HalfClose(stream.try_clone().unwrap()))),
            from_worker: messages(stream),
            child,
            dir,
        }
    }

    fn send(&mut self, msg: &ToWorker) {
        let frame = encode(msg, DEFAULT_MAX_FRAME).unwrap();
        self.to_worker.as_mut().unwrap().write_all(&frame).unwrap();
    }

    fn recv(&self) -> FromWorker {
        self.from_worker
            .recv_timeout(WAIT)
            .expect("a message from the worker in time")
            .expect("a message, not EOF")
    }

    fn call(&mut self, id: u64, method: &str, body: Value) {
        self.send(&ToWorker::Call {
            id,
            method: method.into(),
            body,
            session: None,
            deadline_ms: None,
        });
    }

    /// The worker's exit status, waiting up to `limit`.
    fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "the worker did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The runtime's writing half of a socket: dropped, it half-closes the connection (the worker's
/// EOF), as the runtime's close does; the reader's clone stays open.
struct HalfClose(std::os::unix::net::UnixStream);

impl Write for HalfClose {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for HalfClose {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

/// The worker's messages from `input`, read on a thread of their own; `None` at EOF.
fn messages(mut input: impl Read + Send + 'static) -> mpsc::Receiver<Option<FromWorker>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || loop {
        let msg = read_frame(&mut input, DEFAULT_MAX_FRAME)
            .unwrap()
            .map(|payload| decode::<FromWorker>(&payload).unwrap());
        let end = msg.is_none();
        if tx.send(msg).is_err() || end {
            return;
        }
    });
    rx
}

/// The reply FIFO's reader; closes the keepers at the first byte, as the runtime does.
struct FirstByte {
    file: File,
    keepers: Option<(File, File)>,
}

impl Read for FirstByte {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        if n > 0 {
            self.keepers = None;
        }
        Ok(n)
    }
}

fn set_blocking(file: &File) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL).unwrap());
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).unwrap();
}

#[test]
fn both_sdks_serve_over_fifos() {
    for (name, cmd) in workers() {
        serves(name, Runtime::over_fifos(name, cmd));
    }
}

#[test]
fn both_sdks_serve_over_a_socket() {
    for (name, cmd) in workers() {
        serves(name, Runtime::over_a_socket(name, cmd));
    }
}

fn serves(name: &str, mut rt: Runtime) {
    {
        rt.send(&ToWorker::Init {
            id: 0,
            version: wharf_protocol::PROTOCOL_VERSION,
        });
        match rt.recv() {
            FromWorker::InitPong { status, .. } => assert_eq!(status, InitStatus::Ok, "{name}"),
            other => panic!("{name}: expected init_pong, got {other:?}"),
        }
        let big = Value::Binary(vec![0xA5; 1_500_000]);
        rt.call(1, "echo", big.clone());
        match rt.recv() {
            FromWorker::Ok { id: 1, body } => assert!(body == big, "{name}: the body changed"),
            other => panic!("{name}: expected ok, got {other:?}"),
        }
        // Read while a call runs: a cancel ends a long wait early.
        rt.call(2, "wait", Value::Map(vec![("ms".into(), 30_000.into())]));
        std::thread::sleep(Duration::from_millis(100));
        let cancelled = Instant::now();
        rt.send(&ToWorker::Cancel { id: 2 });
        match rt.recv() {
            FromWorker::Error { id: 2, kind, .. } => assert_eq!(kind, "cancelled", "{name}"),
            other => panic!("{name}: expected the cancelled error, got {other:?}"),
        }
        assert!(cancelled.elapsed() < Duration::from_secs(5), "{name}");
        // EOF on its input: exit 0 within the exit bound.
        rt.to_worker = None;
        let status = rt.exit_within(Duration::from_secs(2));
        assert_eq!(status.code(), Some(0), "{name}");
    }
}

#[test]
fn a_worker_whose_reply_fifo_nobody_reads_exits_non_zero_at_once() {
    for (name, mut cmd) in workers() {
        let dir = fifo_dir(&format!("unread-{name}"));
        // The runtime's writer is there (so the request FIFO opens), but no reader of replies.
        let _keep_in = open(&dir.join("in"), false);
        let _to_worker = open(&dir.join("in"), true);
        let mut child = cmd
            .env("WHARF_CHANNEL", "fifo")
            .env("WHARF_FIFO_IN", dir.join("in"))
            .env("WHARF_FIFO_OUT", dir.join("out"))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > WAIT {
                let _ = child.kill();
                panic!("{name}: the worker waits for a reader instead of exiting");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!status.success(), "{name}: {status:?}");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(stderr.contains("nobody reads it"), "{name}: {stderr}");
    }
}
