//! The raw floor: one Python demo worker on a pipe pair, driven by a hand-written blocking loop
//! with the same framing and messages — no runtime, no actors, no pool. What wharf costs is
//! measured against this.
//!
//! Also the *async* floor: the same loop written on tokio's pipes in one task (write the frame,
//! read the reply), so the cost of waiting through the reactor rather than in a blocking `read`
//! can be told apart from the cost of wharf itself.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use wharf_protocol::frame::{check_len, decode, encode, read_frame};
use wharf_protocol::{FromWorker, ToWorker, Value};

use crate::Env;

/// One worker process and its two pipes.
pub struct RawWorker {
    child: Killed,
    to: File,
    from: BufReader<File>,
    next_id: u64,
}

fn high_pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let lift = |fd: OwnedFd| -> anyhow::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
        // SAFETY: fcntl just returned this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    Ok((lift(r)?, lift(w)?))
}

impl RawWorker {
    /// Spawns the demo worker with its channel on fds 3/4 and completes the init handshake.
    pub fn spawn(env: &Env) -> anyhow::Result<Self> {
        let (to_r, to_w) = high_pipe()?;
        let (from_r, from_w) = high_pipe()?;
        let (cr, cw) = (to_r.as_raw_fd(), from_w.as_raw_fd());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "wharf_worker.demo"])
            .env("PYTHONPATH", env.python_path())
            .env("WHARF_CHANNEL", "fds")
            .stdin(Stdio::null());
        // SAFETY: only dup2 between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(cr, 3) < 0 || libc::dup2(cw, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawn python3")?;
        drop((to_r, from_w));
        let mut w = RawWorker {
            child: Killed(child),
            to: File::from(to_w),
            from: BufReader::with_capacity(1 << 16, File::from(from_r)),
            next_id: 1,
        };
        w.send(&ToWorker::Init { id: 0, version: 1 })?;
        match w.recv()? {
            FromWorker::InitPong { .. } => Ok(w),
            other => bail!("unexpected {other:?}"),
        }
    }

    fn send(&mut self, msg: &ToWorker) -> anyhow::Result<()> {
        self.to.write_all(&encode(msg, 1 << 24)?)?;
        Ok(())
    }

    fn recv(&mut self) -> anyhow::Result<FromWorker> {
        let payload = read_frame(&mut self.from, 1 << 24)?.context("worker closed its channel")?;
        Ok(decode(&payload)?)
    }

    /// One echo round trip.
    pub fn echo(&mut self, body: &Value) -> anyhow::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ToWorker::Call {
            id,
            method: "echo".into(),
            body: body.clone(),
            session: None,
            deadline_ms: None,
        })?;
        match self.recv()? {
            FromWorker::Ok { id: got, .. } if got == id => Ok(()),
            other => bail!("unexpected {other:?}"),
        }
    }
}

impl RawWorker {
    /// The same worker and pipes, driven through tokio's reactor instead of blocking calls.
    pub fn into_async(self) -> anyhow::Result<AsyncRawWorker> {
        anyhow::ensure!(
            self.from.buffer().is_empty(),
            "bytes left over from the handshake"
        );
        Ok(AsyncRawWorker {
            to: tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(self.to))?,
            from: tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(
                self.from.into_inner(),
            ))?,
            buf: Vec::new(),
            next_id: self.next_id,
            _child: self.child,
        })
    }
}

/// The async floor: one worker, its pipes in tokio's reactor, one task driving both.
pub struct AsyncRawWorker {
    to: tokio::net::unix::pipe::Sender,
    from: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
    next_id: u64,
    _child: Killed,
}

impl AsyncRawWorker {
    /// One echo round trip.
    pub async fn echo(&mut self, body: &Value) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let id = self.next_id;
        self.next_id += 1;
        let call = ToWorker::Call {
            id,
            method: "echo".into(),
            body: body.clone(),
            session: None,
            deadline_ms: None,
        };
        self.to.write_all(&encode(&call, 1 << 24)?).await?;
        let mut header = [0u8; 4];
        self.from.read_exact(&mut header).await?;
        let len = check_len(u32::from_be_bytes(header), 1 << 24)?;
        self.buf.resize(len, 0);
        self.from.read_exact(&mut self.buf).await?;
        match decode(&self.buf)? {
            FromWorker::Ok { id: got, .. } if got == id => Ok(()),
            other => bail!("unexpected {other:?}"),
        }
    }
}

/// A worker process that is killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
