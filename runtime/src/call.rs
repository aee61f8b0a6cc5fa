//! What every call shares, whoever makes it (a [`Pool`](crate::Pool), a [`Lease`] or a
//! [`Session`](crate::Session)): per-call options, typed replies, and streamed replies as a
//! [`futures::Stream`].

use std::any::Any;
use std::future::Future;
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
/// stream. Dropped before its end, the stream tells the worker to cancel at once; the worker
/// goes back to its pool only after it has finished the call.
pub struct CallStream<'a> {
    holder: Holder<'a>,
    handle: WorkerHandle,
    pool: Arc<Inner>,
    rx: StreamReceiver,
    /// The call counts as under way until the stream is dropped.
    _active: ActiveCall,
    /// `None`: no limit.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
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
        let timer = tokio::time::Instant::now()
            .checked_add(opened.deadline)
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        Self {
            holder,
            handle: opened.handle,
            pool,
            rx: opened.rx,
            _active: opened.active,
            timer,
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
        let item = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(StreamEvent::Chunk { body, .. })) => {
                return Poll::Ready(Some(Ok(StreamItem::Chunk(body))))
            }
            Poll::Ready(Some(StreamEvent::End(Ok(body)))) => Ok(StreamItem::Done(body)),
            Poll::Ready(Some(StreamEvent::End(Err(e)))) => Err(Error::from_port(id, e)),
            // The port closed with events it could not queue: it knows why.
            Poll::Ready(None) => Err(Error::from_port(
                id,
                self.handle.port.close_reason().unwrap_or(PortError::Closed),
            )),
            Poll::Pending => {
                let expired = self
                    .timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
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
            (Err(e), Holder::Session(hold)) => Err(hold.failed(e)),
            (item, _) => item,
        };
        Poll::Ready(Some(item))
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
