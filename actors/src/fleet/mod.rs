//! Fleets: the Docker engines one pool spreads its workers over, and whether each is up.
//!
//! A [`Fleet`] holds a pool's engines (each with its capacity and start-up concurrency, see
//! [`FleetEngine`]) and one health monitor per engine. The monitor pings the engine (`/_ping`)
//! under a timeout every [`HealthOptions::interval`] and follows its event stream; it publishes
//! a [`Health`] the supervisor watches. The rules, and why:
//!
//! - **Down at once** when the engine answers with an error or refuses the connection (a killed
//!   daemon): that is an answer, not a guess.
//! - **Down after [`HealthOptions::down_after`] missed pings in a row** when it does not answer
//!   (a cut link, a stuck daemon): one slow answer from a busy engine must not fail every worker
//!   on it (OpenWhisk's invokers flap between healthy and unhealthy on single missed pings).
//!   A cut link is thus noticed within `down_after × (interval + timeout)`.
//! - **At once, when the events stream ends**: the monitor pings straight away instead of
//!   waiting for its next tick (a killed daemon ends every stream within milliseconds). The
//!   supervisor does the same through [`Fleet::probe`] when a worker dies abnormally.
//! - **Backoff while down** (a circuit breaker): a down engine is pinged again after
//!   `interval`, then twice as long each time, up to [`HealthOptions::max_backoff`].
//! - **Up** on the first answered ping. What an engine that comes back needs before the pool
//!   uses it again (the sweep of the pool's leftovers, its image) is the supervisor's business.
//!
//! [`placement`] says which engine a new worker goes to; [`ship`] copies a pool's image to an
//! engine that lacks it.

pub mod placement;
pub mod ship;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::engine::{Engine, EngineError};

/// An engine of a fleet, with what it may take.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEngine {
    /// The engine.
    pub engine: Engine,
    /// The most workers of one pool it may run at once (`None`: no limit of its own).
    pub capacity: Option<usize>,
    /// The most of the pool's launches under way on it at once (`None`: only the pool's own
    /// limit applies).
    pub startup_concurrency: Option<usize>,
}

impl From<Engine> for FleetEngine {
    fn from(engine: Engine) -> Self {
        FleetEngine {
            engine,
            capacity: None,
            startup_concurrency: None,
        }
    }
}

impl FleetEngine {
    /// Sets the capacity.
    #[must_use]
    pub fn capacity(mut self, workers: usize) -> Self {
        self.capacity = Some(workers);
        self
    }

    /// Sets the start-up concurrency.
    #[must_use]
    pub fn startup_concurrency(mut self, launches: usize) -> Self {
        self.startup_concurrency = Some(launches.max(1));
        self
    }
}

/// Whether an engine is usable, as its health monitor last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not pinged yet.
    Unknown,
    /// It answered its last ping.
    Up,
    /// It is taken for lost.
    Down {
        /// Why: the ping's error, or how many pings went unanswered.
        reason: String,
    },
}

impl Health {
    /// Whether the engine answered its last ping.
    pub fn is_up(&self) -> bool {
        *self == Health::Up
    }
}

/// How engines are watched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthOptions {
    /// Time between pings of an engine that is up (default 1 s).
    pub interval: Duration,
    /// How long a ping may take (default 2 s).
    pub timeout: Duration,
    /// Unanswered pings in a row that take an engine down (default 2).
    pub down_after: u32,
    /// The longest wait between pings of a down engine (default 30 s).
    pub max_backoff: Duration,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            down_after: 2,
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl HealthOptions {
    /// The longest an engine that stops answering can stay up: `down_after` rounds of an
    /// interval and a ping timeout.
    pub fn detection_bound(&self) -> Duration {
        (self.interval + self.timeout) * self.down_after.max(1)
    }
}

/// One engine's monitor state, shared by its monitor task and [`Fleet::probe`].
struct Member {
    spec: FleetEngine,
    health: watch::Sender<Health>,
    /// Unanswered pings in a row.
    missed: Mutex<u32>,
    /// Wakes the monitor for a ping now.
    wake: Notify,
    /// Held while a ping is under way: whoever asks meanwhile takes that ping's verdict rather
    /// than sending one of its own (several crashes during one slow answer are one round, and
    /// one miss, not several).
    pinging: tokio::sync::Mutex<()>,
    /// Pings completed.
    rounds: AtomicU64,
}

impl Member {
    /// Pings the engine once and records what came of it; returns the health after. If a
    /// ping is already under way, waits for it and returns its verdict instead.
    async fn ping(&self, options: &HealthOptions) -> Health {
        let seen = self.rounds.load(Ordering::Acquire);
        let _turn = self.pinging.lock().await;
        if self.rounds.load(Ordering::Acquire) != seen {
            return self.health.borrow().clone();
        }
        let health = self.ping_now(options).await;
        self.rounds.fetch_add(1, Ordering::AcqRel);
        health
    }

    async fn ping_now(&self, options: &HealthOptions) -> Health {
        let engine = &self.spec.engine;
        let mut result = engine.ping(options.timeout).await;
        if result.is_ok() && !engine.is_negotiated() {
            // Its first answer: speak its own API version from now on.
            result = engine.negotiate(options.timeout).await;
        }
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        let health: Health = match result {
            Ok(()) => {
                *missed = 0;
                Health::Up
            }
            Err(EngineError::Timeout { after, .. }) => {
                *missed += 1;
                if *missed >= options.down_after.max(1) {
                    Health::Down {
                        reason: format!("{} pings in a row unanswered within {after:?}", *missed),
                    }
                } else {
                    // One missed ping changes nothing yet.
                    self.health.borrow().clone()
                }
            }
            Err(e) => {
                *missed = options.down_after.max(1);
                Health::Down {
                    reason: e.to_string(),
                }
            }
        };
        drop(missed);
        self.health.send_if_modified(|h| {
            // The first reason a down engine was given stands until it is up again.
            let same = matches!((&*h, &health), (Health::Down { .. }, Health::Down { .. }));
            if *h == health || same {
                return false;
            }
            engine.set_lost(!health.is_up());
            match &health {
                Health::Down { reason } => {
                    tracing::warn!(engine = %self.spec.engine.name(), reason, "engine down")
                }
                _ => tracing::info!(engine = %self.spec.engine.name(), "engine up"),
            }
            *h = health.clone();
            true
        });
        health
    }
}

/// A pool's engines and their health monitors. The monitors run while the fleet lives.
pub struct Fleet {
    members: Vec<Arc<Member>>,
    options: HealthOptions,
    monitors: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("engines", &self.names())
            .field("options", &self.options)
            .finish()
    }
}

impl Fleet {
    /// A fleet of `engines`, each watched under `options` from now on (this spawns a task per
    /// engine: call it within a tokio runtime).
    pub fn new(engines: Vec<FleetEngine>, options: HealthOptions) -> Arc<Fleet> {
        let members: Vec<Arc<Member>> = engines
            .into_iter()
            .map(|spec| {
                Arc::new(Member {
                    spec,
                    health: watch::Sender::new(Health::Unknown),
                    missed: Mutex::new(0),
                    wake: Notify::new(),
                    pinging: tokio::sync::Mutex::new(()),
                    rounds: AtomicU64::new(0),
                })
            })
            .collect();
        let monitors = members
            .iter()
            .map(|m| tokio::spawn(monitor(m.clone(), options)))
            .collect();
        Arc::new(Fleet {
            members,
            options,
            monitors,
        })
    }

    /// How many engines.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the fleet has no engine.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Engine `i` and what it may take.
    pub fn engine(&self, i: usize) -> &FleetEngine {
        &self.members[i].spec
    }

    /// The engines' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.spec.engine.name().to_owned())
            .collect()
    }

    /// The index of the engine named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.spec.engine.name() == name)
    }

    /// How the engines are watched.
    pub fn options(&self) -> &HealthOptions {
        &self.options
    }

    /// Engine `i`'s health now.
    pub fn health(&self, i: usize) -> Health {
        self.members[i].health.borrow().clone()
    }

    /// Engine `i`'s health, as it changes.
    pub fn subscribe(&self, i: usize) -> watch::Receiver<Health> {
        self.members[i].health.subscribe()
    }

    /// Pings engine `i` now (besides its monitor's rhythm) and returns its health after.
    pub async fn probe(&self, i: usize) -> Health {
        self.members[i].ping(&self.options).await
    }

    /// Asks engine `i`'s monitor for a ping now.
    pub fn suspect(&self, i: usize) {
        self.members[i].wake.notify_one();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for monitor in &self.monitors {
            monitor.abort();
        }
    }
}

/// Watches one engine: pings on a rhythm (backing off while it is down), and at once when its
/// event stream ends or someone suspects it.
async fn monitor(member: Arc<Member>, options: HealthOptions) {
    let mut events = Box::pin(member.spec.engine.events());
    let mut events_open = true;
    let mut wait = options.interval;
    loop {
        let health = member.ping(&options).await;
        wait = if health.is_up() {
            options.interval
        } else {
            (wait * 2).clamp(options.interval, options.max_backoff.max(options.interval))
        };
        if health.is_up() && !events_open {
            events = Box::pin(member.spec.engine.events());
            events_open = true;
        }
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = member.wake.notified() => break,
                event = events.next(), if events_open => match event {
                    Some(Ok(_)) => continue,
                    // The stream is gone: so, most likely, is the daemon. Ping now.
                    Some(Err(_)) | None => {
                        events_open = false;
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine that takes connections and never answers: every ping times out.
    fn silent_engine(dir: &std::path::Path) -> (Engine, tokio::task::JoinHandle<()>) {
        let path = dir.join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                conns.push(conn);
            }
        });
        let host = format!("unix://{}", path.display());
        let engine = Engine::at("silent", &host, None, Duration::from_secs(5)).unwrap();
        (engine, held)
    }

    #[tokio::test]
    async fn probes_during_one_slow_ping_are_one_round_and_one_miss() {
        let dir = std::env::temp_dir().join(format!("wharf-fleet-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (engine, held) = silent_engine(&dir);
        let options = HealthOptions {
            interval: Duration::from_secs(600),
            timeout: Duration::from_millis(300),
            down_after: 2,
            max_backoff: Duration::from_secs(600),
        };
        let fleet = Fleet::new(vec![FleetEngine::from(engine)], options);
        // Four crashes at once each ask for a probe, while the monitor's first ping is out.
        let probes = futures::future::join_all((0..4).map(|_| fleet.probe(0))).await;
        for health in probes {
            assert!(!matches!(health, Health::Down { .. }), "{health:?}");
        }
        assert_eq!(*fleet.members[0].missed.lock().unwrap(), 1);
        // A second round is a second miss: down, as `down_after` says.
        assert!(matches!(fleet.probe(0).await, Health::Down { .. }));
        held.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
