//! A worker's channel over a pair of FIFOs (named pipes): the container host's `fifo` transport.
//!
//! [`Fifos::make`] creates the two FIFOs in a channel directory and opens the runtime's ends
//! at once, before the worker exists: the request FIFO ([`FIFO_IN`], the worker reads it) for
//! writing, the reply FIFO ([`FIFO_OUT`], the worker writes it) for reading. Opening a FIFO
//! blocks until its other end is open (or, non-blocking, fails with `ENXIO` for a writer with
//! no reader), and a reader whose writer has not opened yet reads EOF. So until the worker's
//! first byte arrives, the runtime also holds the far end of each FIFO itself (the *keepers*):
//!
//! - no open blocks or fails on either side, whatever the order: the worker finds a writer
//!   on the request FIFO and a reader on the reply FIFO;
//! - a worker that has not opened the reply FIFO yet is not taken for a dead one (no EOF
//!   while a keeper writes nothing to it).
//!
//! The keepers go as soon as the worker's first byte is read (it has opened both ends: it
//! writes only after it has read), or once the worker is known to have ended (the engine's
//! `wait`), whichever comes first. From then on the FIFOs behave as a process's pipes: the
//! worker's exit is EOF for the runtime, the runtime's close is EOF for the worker, and a write
//! to a dead worker fails with `EPIPE`.

use std::fs::File;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::watch;

/// The request FIFO's name in the channel directory: the runtime writes, the worker reads.
pub(crate) const FIFO_IN: &str = "in";
/// The reply FIFO's name in the channel directory: the worker writes, the runtime reads.
pub(crate) const FIFO_OUT: &str = "out";

/// The runtime's ends of a FIFO pair, and the keepers of the worker's ends.
pub(crate) struct Fifos {
    tx: pipe::Sender,
    rx: pipe::Receiver,
    keepers: Arc<Keepers>,
}

/// The far ends the runtime holds until the worker has opened its own (see the module).
struct Keepers(Mutex<Option<(File, File)>>);

impl Keepers {
    /// Closes the keepers (once; later calls do nothing).
    fn release(&self) {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }
}

impl Fifos {
    /// Makes the FIFO pair in `dir` and opens the runtime's ends and the keepers. The request
    /// FIFO is readable and the reply FIFO writable by any user (a worker running as another
    /// user than the runtime must open them); `dir`'s parent keeps other local users out.
    pub(crate) fn make(dir: &Path) -> io::Result<Fifos> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let (to_worker, from_worker) = (dir.join(FIFO_IN), dir.join(FIFO_OUT));
        for (path, mode) in [(&to_worker, 0o644), (&from_worker, 0o622)] {
            nix::unistd::mkfifo(path.as_path(), nix::sys::stat::Mode::S_IRWXU)?;
            // Set after the fact: mkfifo's mode is masked by the umask.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        let keeper = |path: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
        };
        // A reader first, so that opening the writer finds one (no ENXIO) ...
        let hold_in = keeper(&to_worker, false)?;
        let tx = pipe::OpenOptions::new().open_sender(&to_worker)?;
        // ... and the reader first here too, so that the keeper writer finds one.
        let rx = pipe::OpenOptions::new().open_receiver(&from_worker)?;
        let hold_out = keeper(&from_worker, true)?;
        Ok(Fifos {
            tx,
            rx,
            keepers: Arc::new(Keepers(Mutex::new(Some((hold_in, hold_out))))),
        })
    }

    /// The channel's two byte streams for the router: replies from the worker, requests to it.
    /// `exit` publishes the worker's end: if that comes before its first byte, the keepers go
    /// then, so the reader sees EOF.
    pub(crate) fn into_channel(
        self,
        mut exit: watch::Receiver<Option<ExitStatus>>,
    ) -> (
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
    ) {
        let keepers = self.keepers.clone();
        tokio::spawn(async move {
            // An exit, or the sender gone (the container's watch ended): either way no
            // worker's first byte is worth waiting for any more.
            let _ = exit.wait_for(Option::is_some).await;
            keepers.release();
        });
        let input = FifoInput {
            rx: self.rx,
            keepers: Some(self.keepers),
        };
        (Box::new(input), Box::new(self.tx))
    }
}

/// The reply FIFO's reader: lets the keepers go at the first byte read.
struct FifoInput {
    rx: pipe::Receiver,
    /// `None` once released.
    keepers: Option<Arc<Keepers>>,
}

impl AsyncRead for FifoInput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.rx).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(keepers) = self.keepers.take() {
                keepers.release();
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A worker's side of the pair, opened as the SDKs do (non-blocking opens, then blocking).
    fn worker_ends(dir: &Path) -> (File, File) {
        let open = |name: &str, write: bool| {
            let f = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(dir.join(name))
                .unwrap();
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let flags = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GETFL);
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    libc::F_SETFL,
                    flags & !libc::O_NONBLOCK,
                );
            }
            f
        };
        (open(FIFO_IN, false), open(FIFO_OUT, true))
    }

    /// Fails unless `input` reads EOF within 5 s.
    async fn assert_eof(input: &mut (dyn AsyncRead + Send + Unpin), when: &str) {
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(5), input.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no EOF {when}: a hang"))
            .unwrap();
        assert_eq!(n, 0, "read {n} bytes, not EOF, {when}");
    }

    type Exit = watch::Sender<Option<ExitStatus>>;
    type Input = Box<dyn AsyncRead + Send + Unpin>;
    type Output = Box<dyn AsyncWrite + Send + Unpin>;

    /// A FIFO pair in a fresh directory, the runtime's ends as the router gets them, and the
    /// sender of the worker's exit.
    fn channel(name: &str) -> (std::path::PathBuf, Exit, Input, Output) {
        let dir =
            std::env::temp_dir().join(format!("wharf-fifo-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (input, output) = Fifos::make(&dir).unwrap().into_channel(exit_rx);
        (dir, exit_tx, input, output)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_the_workers_exit_is_eof() {
        let (dir, _exit_tx, mut input, mut output) = channel("flow");
        let (mut w_in, mut w_out) = worker_ends(&dir);
        output.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        w_in.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        w_out.write_all(b"pong").unwrap();
        input.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        // The worker goes: EOF for the runtime (the keepers went with the first byte).
        drop((w_in, w_out));
        assert_eof(&mut *input, "after the worker closed its ends").await;
        // And a write to the gone worker fails.
        assert!(output.write_all(b"x").await.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn no_eof_before_the_worker_opens_and_eof_once_it_is_known_dead() {
        let (dir, exit_tx, mut input, mut output) = channel("early");
        // The request is buffered for a worker that has not opened its end yet.
        output.write_all(b"init").await.unwrap();
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), input.read(&mut got)).await;
        assert!(
            early.is_err(),
            "read {early:?} before the worker opened its end"
        );
        // A worker that opens and closes without a word is not seen while the keepers hold ...
        drop(worker_ends(&dir));
        let still = tokio::time::timeout(Duration::from_millis(300), input.read(&mut got)).await;
        assert!(still.is_err(), "read {still:?} while the keepers hold");
        // ... its end, once published, is EOF.
        use std::os::unix::process::ExitStatusExt;
        exit_tx.send(Some(ExitStatus::from_raw(0))).unwrap();
        assert_eof(&mut *input, "after the exit").await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_runtimes_close_is_the_workers_eof() {
        let (dir, _exit_tx, _input, output) = channel("close");
        let (mut w_in, _w_out) = worker_ends(&dir);
        drop(output);
        let mut rest = Vec::new();
        assert_eq!(w_in.read_to_end(&mut rest).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
