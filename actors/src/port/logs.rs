//! Forwarding a worker's stdout/stderr into `tracing`, line by line, with bounded memory.
//!
//! A worker may print anything: very long lines, invalid UTF-8, floods. Lines are cut at
//! [`MAX_LINE`] bytes, decoded lossily, logged with the worker's id, and the last few stderr lines
//! are kept for error reports. The pipe is always drained, so a chatty worker never blocks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line forwarded; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 4096;
/// How many recent stderr lines are kept for error reports.
pub const TAIL_LINES: usize = 20;

/// The most recent lines of a stream, shared with whoever reports errors.
#[derive(Debug, Clone)]
pub struct Tail {
    lines: Arc<Mutex<VecDeque<String>>>,
    eof: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Tail {
    fn default() -> Self {
        Self {
            lines: Arc::default(),
            eof: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl Tail {
    /// Waits up to `limit` for the stream to reach EOF (all its lines kept).
    pub async fn wait_eof(&self, limit: Duration) {
        let mut eof = self.eof.subscribe();
        let _ = tokio::time::timeout(limit, eof.wait_for(|done| *done)).await;
    }

    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// A copy of the kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect()
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// The worker's stdout (a log in `fds` mode).
    Stdout,
    /// The worker's stderr.
    Stderr,
}

/// Reads `reader` to EOF, logging each line; keeps recent lines in `tail` if given.
pub async fn forward<R: AsyncRead + Unpin>(
    mut reader: R,
    worker: String,
    stream: Stream,
    tail: Option<Tail>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let mut discarding = false;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
            let ends = chunk.last() == Some(&b'\n');
            let body = if ends {
                &chunk[..chunk.len() - 1]
            } else {
                chunk
            };
            if !discarding {
                let room = MAX_LINE - line.len();
                line.extend_from_slice(&body[..body.len().min(room)]);
                if body.len() > room {
                    emit(&worker, stream, tail.as_ref(), &line, true);
                    line.clear();
                    discarding = true;
                }
            }
            if ends {
                if !discarding {
                    emit(&worker, stream, tail.as_ref(), &line, false);
                }
                line.clear();
                discarding = false;
            }
        }
    }
    if !line.is_empty() && !discarding {
        emit(&worker, stream, tail.as_ref(), &line, false);
    }
    if let Some(tail) = tail {
        tail.eof.send_replace(true);
    }
}

fn emit(worker: &str, stream: Stream, tail: Option<&Tail>, line: &[u8], cut: bool) {
    let mut text = String::from_utf8_lossy(line).into_owned();
    if cut {
        text.push_str(" [line cut]");
    }
    match stream {
        Stream::Stdout => {
            tracing::info!(target: "wharf::worker", worker, stream = "stdout", "{text}")
        }
        Stream::Stderr => {
            tracing::info!(target: "wharf::worker", worker, stream = "stderr", "{text}")
        }
    }
    if let Some(tail) = tail {
        tail.push(text);
    }
}
