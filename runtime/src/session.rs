//! Sessions: one worker pinned strictly and exclusively to one session id.
//!
//! While a session is open its worker serves no one else. When it ends (explicitly, by
//! dropping every handle, or after being idle too long) the worker is reset or recycled, by the
//! pool's policy, so no state crosses sessions. If the pinned worker dies, the session is lost:
//! its calls fail with [`Error::SessionLost`] rather than moving silently to a fresh worker that
//! lacks the state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use wharf_protocol::Value;

use crate::call::{decode, CallOptions, CallStream, Holder};
use crate::config::SessionEnd;
use crate::error::{Error, Result};
use crate::events::PoolEvent;
use crate::lease::Lease;
use crate::pool::{to_value, Hold, Inner};

enum Pin {
    Open(Lease),
    Lost(String),
    Ended(&'static str),
}

struct SessionInner {
    id: String,
    pool: Arc<Inner>,
    pin: Arc<tokio::sync::Mutex<Pin>>,
    last_used: Mutex<Instant>,
    /// Whether this session still holds its id in the pool's registry (a lost or ended
    /// session gives it up, and a new session may then take it).
    registered: AtomicBool,
}

impl SessionInner {
    /// The session's lease, if the session is still open; why not otherwise.
    fn open_lease<'p>(&self, pin: &'p mut Pin) -> Result<&'p mut Lease> {
        match pin {
            Pin::Open(lease) => Ok(lease),
            Pin::Lost(cause) => Err(self.lost(cause.clone())),
            Pin::Ended(why) => Err(Error::SessionEnded {
                session: self.id.clone(),
                why,
            }),
        }
    }

    /// What a failed call means for the session. A remote error or a bad body leaves the
    /// worker serving; any other failure means the worker is gone (died, killed on deadline,
    /// broke the protocol), and the session's state went with it.
    fn failed(&self, pin: &mut Pin, e: Error) -> Error {
        match e {
            e @ (Error::Remote { .. } | Error::Body(_) | Error::Reply { .. }) => e,
            e => {
                let cause = e.to_string();
                *pin = Pin::Lost(cause.clone());
                self.release_id();
                self.pool.events.emit(|| PoolEvent::SessionLost {
                    pool: self.pool.name().to_owned(),
                    session: self.id.clone(),
                    cause: cause.clone(),
                });
                self.lost(cause)
            }
        }
    }

    fn lost(&self, cause: String) -> Error {
        Error::SessionLost {
            session: self.id.clone(),
            cause,
        }
    }

    /// Gives the session's id back to the pool, once.
    fn release_id(&self) {
        if self.registered.swap(false, Ordering::AcqRel) {
            self.pool
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.id);
        }
    }
}

/// A strict session: a handle to one pinned worker. Clones share the same session; it ends
/// when [`Session::end`] is called, the last clone drops, or it stays unused for the pool's
/// session idle timeout.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use serde_json::json;
/// use wharf::{Error, Pool, ProcessSpec};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).size(2).build().await?;
///
/// let alice = pool.session("alice").await?;
/// alice.call::<()>("state_set", &json!({"key": "cart", "value": 3})).await?;
/// let cart: u32 = alice.call("state_get", &json!({"key": "cart"})).await?;
/// assert_eq!(cart, 3);
/// // One open session per id: share this handle (it is Clone) instead.
/// assert!(matches!(pool.session("alice").await, Err(Error::SessionInUse(_))));
///
/// alice.end().await?; // the worker is reset before anyone else gets it
/// let ended = alice.call::<()>("state_get", &json!({"key": "cart"})).await;
/// assert!(matches!(ended, Err(Error::SessionEnded { .. })));
///
/// let bob = pool.session("bob").await?;
/// let cart: Option<u32> = bob.call("state_get", &json!({"key": "cart"})).await?;
/// assert_eq!(cart, None); // nothing crosses sessions
/// # pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Session {
    pub(crate) async fn open(pool: Arc<Inner>, id: String) -> Result<Session> {
        if !pool
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone())
        {
            return Err(Error::SessionInUse(id));
        }
        // Until the session exists, the id is given back however the open ends: an error, or
        // the caller giving up while it waits for a worker.
        let mut claim = IdClaim {
            pool: &pool,
            id: &id,
            armed: true,
        };
        // On a pool spread over engines, a worker on the session's home engine if one is free.
        let home = pool.home_engine(&id);
        let timeout = Some(pool.config.checkout_timeout);
        let mut lease = pool
            .checkout_preferring(timeout, Hold::Exclusive, home.as_deref())
            .await?;
        claim.armed = false;
        drop(claim);
        lease.set_session(id.clone());
        let inner = Arc::new(SessionInner {
            id,
            pool,
            pin: Arc::new(tokio::sync::Mutex::new(Pin::Open(lease))),
            last_used: Mutex::new(Instant::now()),
            registered: AtomicBool::new(true),
        });
        let ttl = inner.pool.config.session_idle_timeout;
        tokio::spawn(expire_when_idle(Arc::downgrade(&inner), ttl));
        Ok(Session { inner })
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether the session still holds its worker: false once it has ended (explicitly or by
    /// expiry) or lost its worker, when its calls fail and a new session may take its id.
    pub fn is_open(&self) -> bool {
        self.inner.registered.load(Ordering::Acquire)
    }

    /// The pinned worker's name, while the session is open.
    pub async fn worker_id(&self) -> Option<String> {
        match &*self.inner.pin.lock().await {
            Pin::Open(lease) => Some(lease.worker_id().to_owned()),
            _ => None,
        }
    }

    /// The pinned worker's OS process id, while the session is open.
    pub async fn pid(&self) -> Option<u32> {
        match &*self.inner.pin.lock().await {
            Pin::Open(lease) => Some(lease.pid()),
            _ => None,
        }
    }

    /// Calls `method` on the pinned worker and decodes the reply as `R` (a [`Value`] is
    /// handed over as it is).
    pub async fn call<R: DeserializeOwned + 'static>(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R> {
        self.call_with(method, body, CallOptions::new()).await
    }

    /// [`Session::call`] with options for this call.
    pub async fn call_with<R: DeserializeOwned + 'static>(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<R> {
        let reply = self.call_value(method, to_value(body)?, options).await?;
        decode(method, reply)
    }

    /// Calls `method` on the pinned worker with a MessagePack body; the raw reply.
    pub async fn call_value(
        &self,
        method: &str,
        body: Value,
        options: CallOptions,
    ) -> Result<Value> {
        let mut pin = self.inner.pin.lock().await;
        // Idle time counts from the end of the last call: while a call runs, the pin is locked
        // and the session cannot expire; when it ends, the clock starts again.
        let _touch = Touch(&self.inner.last_used);
        let lease = self.inner.open_lease(&mut pin)?;
        let result = lease.call_value(method, body, options).await;
        result.map_err(|e| self.inner.failed(&mut pin, e))
    }

    /// Calls a streaming method on the pinned worker. The session's other calls wait until
    /// the stream's final item has been read (or the stream is dropped, and its cancelled
    /// call has ended).
    pub async fn call_stream(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<CallStream<'static>> {
        self.call_stream_with(method, body, CallOptions::new())
            .await
    }

    /// [`Session::call_stream`] with options for this call.
    pub async fn call_stream_with(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<CallStream<'static>> {
        let body = to_value(body)?;
        let mut pin = self.inner.pin.clone().lock_owned().await;
        let opened = {
            let _touch = Touch(&self.inner.last_used);
            let lease = self.inner.open_lease(&mut pin)?;
            match lease.open_stream(method, body, options).await {
                Ok(opened) => opened,
                Err(e) => return Err(self.inner.failed(&mut pin, e)),
            }
        };
        let pool = self.inner.pool.clone();
        let hold = SessionHold {
            pin,
            session: self.inner.clone(),
        };
        Ok(CallStream::new(pool, opened, Holder::Session(hold)))
    }

    /// Ends the session now: the worker is reset (or recycled, by policy) before anyone else
    /// may use it. Later calls on any clone fail with [`Error::SessionEnded`].
    ///
    /// Cancel-safe: the reset runs in a task of its own, so a caller that stops waiting does
    /// not stop it; and a worker whose reset does not succeed, for any reason, is retired
    /// rather than returned to the pool.
    pub async fn end(&self) -> Result<()> {
        let lease = {
            let mut pin = self.inner.pin.lock().await;
            match std::mem::replace(&mut *pin, Pin::Ended("closed")) {
                Pin::Open(lease) => lease,
                other => {
                    *pin = other;
                    return Ok(());
                }
            }
        };
        self.inner.release_id();
        let (pool, id) = (self.inner.pool.clone(), self.inner.id.clone());
        let _ = tokio::spawn(async move { finish(&pool, &id, lease).await }).await;
        Ok(())
    }
}

/// A session's pinned worker held by a stream: the session's other calls wait for it, and a
/// failure that loses the worker loses the session.
pub(crate) struct SessionHold {
    pin: tokio::sync::OwnedMutexGuard<Pin>,
    session: Arc<SessionInner>,
}

impl SessionHold {
    /// What a failed stream means for the session.
    pub(crate) fn failed(&mut self, e: Error) -> Error {
        self.session.failed(&mut self.pin, e)
    }
}

impl Drop for SessionHold {
    fn drop(&mut self) {
        // The session's idle time counts from the end of its stream.
        *lock_instant(&self.session.last_used) = Instant::now();
    }
}

/// A session id claimed in the pool's registry by an open still in progress; dropped, it gives
/// the id back.
struct IdClaim<'a> {
    pool: &'a Inner,
    id: &'a str,
    /// Cleared once the session holds the id.
    armed: bool,
}

impl Drop for IdClaim<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.pool
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id);
    }
}

/// Sets a session's last use to now when dropped: at the end of a call, however it ends.
struct Touch<'a>(&'a Mutex<Instant>);

impl Drop for Touch<'_> {
    fn drop(&mut self) {
        *lock_instant(self.0) = Instant::now();
    }
}

fn lock_instant(m: &Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cleans a session's worker before it returns to the pool: reset, or retire. The lease only
/// returns its worker to the pool once the reset succeeded ([`Lease::session_cleaned`]); if
/// this future is dropped first, the lease retires the worker.
async fn finish(pool: &Arc<Inner>, session: &str, mut lease: Lease) {
    let Some(handle) = lease.handle().cloned() else {
        return;
    };
    if !handle.is_alive() {
        return;
    }
    match pool.config.session_end {
        SessionEnd::Reset => {
            // Let an abandoned call finish first, so the reset is the last thing the worker
            // does for this session.
            let settle =
                tokio::time::timeout(pool.config.drain_timeout, handle.port.quiesce()).await;
            let reset = match settle {
                Ok(()) => handle
                    .port
                    .reset(Some(session.to_owned()), pool.config.session_reset_timeout)
                    .await
                    .map_err(|e| e.to_string()),
                Err(_) => Err("an abandoned call did not finish".to_owned()),
            };
            match reset {
                Ok(()) => lease.session_cleaned(),
                Err(why) => {
                    tracing::warn!(worker = %handle.shared.id, session, why, "session reset failed; recycling the worker");
                    lease.take_handle();
                    handle.retire("session reset failed");
                }
            }
        }
        SessionEnd::Recycle => {
            lease.take_handle();
            handle.retire("session ended");
        }
    }
    drop(lease);
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        // No stream holds the pin any more: a stream keeps its session alive.
        let Ok(mut pin) = self.pin.try_lock() else {
            return;
        };
        let pin = std::mem::replace(&mut *pin, Pin::Ended("closed"));
        self.release_id();
        if let Pin::Open(mut lease) = pin {
            let pool = self.pool.clone();
            let id = self.id.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { finish(&pool, &id, lease).await });
                }
                Err(_) => {
                    // No runtime to reset it: the worker must not be reused with this state.
                    if let Some(handle) = lease.take_handle() {
                        handle.kill(wharf_actors::worker::ExitKind::Recycled(
                            "session dropped".into(),
                        ));
                    }
                }
            }
        }
    }
}

async fn expire_when_idle(session: Weak<SessionInner>, ttl: Duration) {
    let period = (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = session.upgrade() else {
            return;
        };
        let idle = inner
            .last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if idle < ttl {
            continue;
        }
        let lease = {
            let Ok(mut pin) = inner.pin.try_lock() else {
                continue; // a call is running: not idle
            };
            match std::mem::replace(&mut *pin, Pin::Ended("expired")) {
                Pin::Open(lease) => lease,
                other => {
                    *pin = other;
                    return;
                }
            }
        };
        tracing::debug!(session = %inner.id, ?idle, "session expired");
        inner.release_id();
        finish(&inner.pool, &inner.id, lease).await;
        return;
    }
}
