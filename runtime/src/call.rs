//! What every call shares, whoever makes it (a [`Pool`](crate::Pool), a [`Lease`] or a
//! [`Session`](crate::Session)): per-call options, typed replies, and streamed replies as a
//! [`futures::Stream`].

use std::any::Any;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use wharf_actors::port::{PortError, StreamEvent, StreamReceiver};
use wharf_actors::worker::WorkerHandle;
use wharf_protocol::Value;

use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::pool::{ActiveCall, Inner};
use crate::session::SessionHold;

/// Options for one call, the same for a pool, a lease and a session.
///
/// ```
/// use std::time::Duration;
/// use wharf::CallOptions;
///
/// let options = CallOptions::new()
///     .deadline(Duration::from_millis(250))
///     .idempotent();
/// assert_eq!(options.deadline, Some(Duration::from_millis(250)));
/// assert!(options.idempotent);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOptions {
    /// The call's deadline; `None`: the pool's call timeout. A call that overruns it kills its
    /// worker (the worker is told the deadline too, and may give up earlier by itself).
    pub deadline: Option<Duration>,
    /// The method is idempotent: a pool call whose worker dies under it (`WorkerDied`) is
    /// retried on another worker, up to the pool's retry limit. Deadline overruns, remote errors
    /// and protocol violations are never retried. A lease or a session has no other worker to
    /// go to: there the option changes nothing.
    pub idempotent: bool,
}

impl CallOptions {
    /// No deadline of its own (the pool's call timeout), not idempotent.
    pub const fn new() -> Self {
        Self {
            deadline: None,
            idempotent: false,
        }
    }

    /// Sets the call's deadline.
    #[must_use]
    pub const fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Marks the method idempotent: a pool retries it on another worker if its worker dies.
    #[must_use]
    pub const fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }
}

/// Turns a reply into the caller's type. A [`Value`] is handed over as it is, without a copy;
/// `()` discards the reply, whatever it is (a caller that asks for nothing gets nothing, not an
/// error because the method returned something).
pub(crate) fn decode<R: DeserializeOwned + 'static>(method: &str, reply: Value) -> Result<R> {
    let mut nothing = Some(());
    if let Some(unit) = (&mut nothing as &mut dyn Any).downcast_mut::<Option<R>>() {
        return Ok(unit.take().expect("the unit is still in its slot"));
    }
    let mut slot = Some(reply);
    if let Some(raw) = (&mut slot as &mut dyn Any).downcast_mut::<Option<R>>() {
        return Ok(raw.take().expect("the reply is still in its slot"));
    }
    let reply = slot.expect("the reply is still in its slot");
    rmpv::ext::from_value(reply).map_err(|e| Error::Reply {
        method: method.to_owned(),
        reason: e.to_string(),
    })
}

/// One item of a [`CallStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A chunk.
    Chunk(Value),
    /// The call's final result.
    Done(Value),
}

impl StreamItem {
    /// The item's body, chunk or result.
    pub fn into_value(self) -> Value {
        match self {
            StreamItem::Chunk(v) | StreamItem::Done(v) => v,
        }
    }

    /// Whether this is the call's final result.
    pub fn is_done(&self) -> bool {
        matches!(self, StreamItem::Done(_))
    }
}

/// Who keeps the worker of a stream for the stream's life.
#[allow(dead_code)] // the leases are held, not read
pub(crate) enum Holder<'a> {
    /// The caller's lease, borrowed for as long as the stream lives.
    Borrowed(&'a mut Lease),
    /// A lease taken for this stream alone (a pool's stream): back to the pool on drop.
    Owned(Lease),
    /// A session's pinned worker: the session's other calls wait until the stream drops.
    Session(SessionHold),
}

/// The chunks of a streamed call, then its result: a [`futures::Stream`] of
/// [`StreamItem`]s that ends after [`StreamItem::Done`] or an error.
///
/// The deadline (the pool's call timeout unless the call set its own) bounds the whole
/// stream. The stream holds its worker until its final item (the result or an error) has been
/// read: then the worker goes back to its pool, or its session is free for the next call.
/// Dropped before its end, the stream tells the worker to cancel at once; the worker goes back
/// to its pool only after it has finished the call.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use futures::StreamExt;
/// use serde_json::json;
/// use wharf::{Pool, ProcessSpec, StreamItem};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).size(1).build().await?;
///
/// let mut stream = pool.call_stream("stream", &json!({"n": 3})).await?;
/// let mut chunks = Vec::new();
/// while let Some(item) = stream.next().await {
///     match item? {
///         StreamItem::Chunk(v) => chunks.push(v.as_u64().unwrap()),
///         StreamItem::Done(total) => assert_eq!(total.as_u64(), Some(3)),
///     }
/// }
/// assert_eq!(chunks, [0, 1, 2]);
/// // The final result has been read: the worker is back in the pool.
/// assert_eq!(pool.state().idle, 1);
///
/// // A futures::Stream: combinators work; dropping it early cancels the call.
/// let stream = pool.call_stream("stream", &json!({"n": 1000})).await?;
/// let first: Vec<_> = stream.take(2).collect().await;
/// assert_eq!(first.len(), 2);
/// # pool.shutdown().await;
/// # Ok(()) }
/// ```
pub struct CallStream<'a> {
    /// Until the stream's end: then the worker goes back (a pool's stream) or the session is
    /// free for its next call.
    holder: Option<Holder<'a>>,
    handle: WorkerHandle,
    pool: Arc<Inner>,
    rx: StreamReceiver,
    /// The call counts as under way until its end (or until the stream is dropped).
    active: Option<ActiveCall>,
    /// When the deadline runs out (`None`: no limit).
    expires: Option<tokio::time::Instant>,
    /// Kills the worker when the deadline runs out, whether or not anyone polls the stream;
    /// aborted at the stream's end or drop.
    watchdog: Option<Watchdog>,
    deadline: Duration,
    method: String,
    started: Instant,
    done: bool,
}

impl std::fmt::Debug for CallStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("worker", &self.handle.shared.id)
            .field("method", &self.method)
            .field("done", &self.done)
            .finish()
    }
}

/// A stream just opened on a worker, before anyone holds it.
pub(crate) struct Opened {
    pub handle: WorkerHandle,
    pub rx: StreamReceiver,
    pub active: ActiveCall,
    pub deadline: Duration,
    pub method: String,
    pub started: Instant,
}

impl<'a> CallStream<'a> {
    pub(crate) fn new(pool: Arc<Inner>, opened: Opened, holder: Holder<'a>) -> Self {
        let expires = tokio::time::Instant::now().checked_add(opened.deadline);
        let watchdog = expires
            .map(|at| {
                let handle = opened.handle.clone();
                let (method, deadline) = (opened.method.clone(), opened.deadline);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    crate::lease::kill_for_deadline(&handle, &method, deadline);
                })
                .abort_handle()
            })
            .map(Watchdog);
        Self {
            holder: Some(holder),
            handle: opened.handle,
            pool,
            rx: opened.rx,
            active: Some(opened.active),
            expires,
            watchdog,
            deadline: opened.deadline,
            method: opened.method,
            started: opened.started,
            done: false,
        }
    }

    /// The next chunk, or the final result; `None` after the result or an error. The same as
    /// [`futures::StreamExt::next`], without the import.
    pub async fn next(&mut self) -> Option<Result<StreamItem>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The worker serving the stream.
    pub fn worker_id(&self) -> &str {
        &self.handle.shared.id
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<StreamItem>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let id = &self.handle.shared.id;
        // The deadline first: a consumer slower than its worker always finds a chunk waiting.
        let expired = self
            .expires
            .is_some_and(|at| tokio::time::Instant::now() >= at);
        let polled = if expired {
            Poll::Pending
        } else {
            self.rx.poll_recv(cx)
        };
        let item = match polled {
            Poll::Ready(Some(StreamEvent::Chunk { body, .. })) => {
                return Poll::Ready(Some(Ok(StreamItem::Chunk(body))))
            }
            Poll::Ready(Some(StreamEvent::End(Ok(body)))) => Ok(StreamItem::Done(body)),
            // Killed by the watchdog: the deadline is why.
            Poll::Ready(Some(StreamEvent::End(Err(_))) | None)
                if self
                    .expires
                    .is_some_and(|at| tokio::time::Instant::now() >= at) =>
            {
                Err(Error::DeadlineExceeded {
                    worker: id.clone(),
                    method: self.method.clone(),
                    deadline: self.deadline,
                })
            }
            Poll::Ready(Some(StreamEvent::End(Err(e)))) => Err(Error::from_port(id, e)),
            // The port closed with events it could not queue: it knows why.
            Poll::Ready(None) => Err(Error::from_port(
                id,
                self.handle.port.close_reason().unwrap_or(PortError::Closed),
            )),
            Poll::Pending if !expired => {
                // Woken by the next event, or by the watchdog's kill at the deadline.
                return Poll::Pending;
            }
            Poll::Pending => {
                crate::lease::kill_for_deadline(&self.handle, &self.method, self.deadline);
                Err(Error::DeadlineExceeded {
                    worker: id.clone(),
                    method: self.method.clone(),
                    deadline: self.deadline,
                })
            }
        };
        self.done = true;
        self.pool
            .account(&self.method, &item, self.started.elapsed());
        let item = match (item, &mut self.holder) {
            (Err(e), Some(Holder::Session(hold))) => Err(hold.failed(e)),
            (item, _) => item,
        };
        // The call is over: its worker is free now, not when the stream is dropped.
        self.watchdog = None;
        self.holder = None;
        self.active = None;
        Poll::Ready(Some(item))
    }
}

/// The deadline's watchdog task, aborted when the stream ends or is dropped (dropped before its
/// end, the call is cancelled: a pool's worker drains, a lease's or session's next call waits
/// for it to settle — no kill).
struct Watchdog(tokio::task::AbortHandle);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl futures::Stream for CallStream<'_> {
    type Item = Result<StreamItem>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl futures::stream::FusedStream for CallStream<'_> {
    fn is_terminated(&self) -> bool {
        self.done
    }
}
