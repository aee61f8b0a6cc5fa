//! Restart policy: OTP-style strategies, child restart types, restart intensity, and backoff.
//!
//! These are plain values and small state machines with no I/O, so the supervisor's decisions
//! can be tested in isolation and read in one place.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::RngExt;

/// Which workers restart when one of them exits and must be restarted (OTP's strategies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the worker that exited.
    #[default]
    OneForOne,
    /// Stop every other worker and restart them all.
    OneForAll,
    /// Stop the workers started after the exited one (higher slots) and restart them with it.
    RestForOne,
}

/// When a worker that exited is restarted (OTP's child restart types).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartType {
    /// Always.
    #[default]
    Permanent,
    /// Only if it exited abnormally (crashed, was killed, broke the protocol, stopped answering
    /// pings, or failed to start); a worker that exits with status 0 by itself stays down.
    Transient,
    /// Never.
    Temporary,
}

impl RestartType {
    /// Whether a worker that ended this way is restarted.
    pub fn restarts(self, abnormal: bool) -> bool {
        match self {
            RestartType::Permanent => true,
            RestartType::Transient => abnormal,
            RestartType::Temporary => false,
        }
    }
}

/// The most restarts allowed within a sliding window; one more escalates (the pool fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within `within`.
    pub max_restarts: u32,
    /// The window.
    pub within: Duration,
}

impl Default for Intensity {
    /// 10 restarts within 5 seconds: OTP's window with room for a pool of several workers.
    fn default() -> Self {
        Self {
            max_restarts: 10,
            within: Duration::from_secs(5),
        }
    }
}

/// Counts restarts in the sliding window.
#[derive(Debug, Clone)]
pub struct IntensityTracker {
    limit: Intensity,
    restarts: VecDeque<Instant>,
}

impl IntensityTracker {
    /// A tracker with no restarts yet.
    pub fn new(limit: Intensity) -> Self {
        Self {
            limit,
            restarts: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns `false` if that exceeds the intensity.
    pub fn record(&mut self, now: Instant) -> bool {
        while let Some(first) = self.restarts.front() {
            if now.duration_since(*first) > self.limit.within {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        self.restarts.push_back(now);
        self.restarts.len() as u32 <= self.limit.max_restarts
    }

    /// Restarts within the window ending at `now`.
    pub fn recent(&self, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|t| now.duration_since(**t) <= self.limit.within)
            .count()
    }
}

/// Exponential backoff with jitter between restarts of the same slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the second consecutive restart of a slot (the first is immediate).
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// Growth factor per consecutive failure.
    pub multiplier: f64,
    /// Fraction of the delay randomised away (0 = none, 0.5 = delay × [0.5, 1]).
    pub jitter: f64,
    /// A worker that stayed up this long resets its slot's failure count.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before restart number `failures` (1 = first consecutive failure), without
    /// jitter. The first restart after a healthy run is immediate (a lone crash should cost no
    /// more than a cold start); each consecutive failure after it waits `initial`, then
    /// `initial × multiplier`, and so on up to `max`.
    pub fn base_delay(&self, failures: u32) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        let exp = self
            .multiplier
            .powi(failures.saturating_sub(2).min(60) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        // Saturates: a delay too large for a Duration (`max` of `Duration::MAX`) is `max`.
        Duration::try_from_secs_f64(secs).unwrap_or(self.max)
    }

    /// The delay before restart number `failures`, with jitter applied.
    pub fn delay(&self, failures: u32) -> Duration {
        let base = self.base_delay(failures);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || base.is_zero() {
            return base;
        }
        let factor = 1.0 - rand::rng().random_range(0.0..=jitter);
        // Saturates like `base_delay`: near `Duration::MAX`, a factor that rounds to 1 must not
        // overflow.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
    }
}

/// The whole restart policy of a supervisor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Which workers restart together.
    pub strategy: Strategy,
    /// When an exited worker restarts.
    pub restart: RestartType,
    /// How many restarts are tolerated before the pool fails.
    pub intensity: Intensity,
    /// Delays between restarts of one slot.
    pub backoff: Backoff,
    /// A slot whose launches fail this many times in a row, without a worker ever becoming
    /// ready in between, fails the pool at once, whatever the intensity: a command that cannot
    /// start should end in a clear error quickly, not after a long window of retries.
    pub max_start_failures: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            restart: RestartType::default(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            max_start_failures: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_types_follow_otp() {
        assert!(RestartType::Permanent.restarts(false));
        assert!(RestartType::Permanent.restarts(true));
        assert!(!RestartType::Transient.restarts(false));
        assert!(RestartType::Transient.restarts(true));
        assert!(!RestartType::Temporary.restarts(true));
    }

    #[test]
    fn intensity_escalates_past_the_limit_and_forgets_old_restarts() {
        let mut t = IntensityTracker::new(Intensity {
            max_restarts: 2,
            within: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert!(t.record(t0));
        assert!(t.record(t0 + Duration::from_millis(10)));
        assert!(!t.record(t0 + Duration::from_millis(20)));
        // Far later, the window is empty again.
        assert!(t.record(t0 + Duration::from_secs(10)));
        assert_eq!(t.recent(t0 + Duration::from_secs(10)), 1);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(1),
        };
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::ZERO, "a lone crash restarts at once");
        assert_eq!(b.delay(2), Duration::from_millis(100));
        assert_eq!(b.delay(3), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(400));
        assert_eq!(b.delay(10), Duration::from_secs(1));
        let huge = Backoff {
            initial: Duration::MAX,
            max: Duration::MAX,
            ..b
        };
        assert_eq!(huge.delay(2), Duration::MAX, "saturates, never panics");
        assert_eq!(huge.delay(60), Duration::MAX);
        let huge_jitter = Backoff {
            jitter: 1e-17,
            ..huge
        };
        for failures in [2, 3, 60] {
            let _ = huge_jitter.delay(failures); // never panics
        }
        let j = Backoff { jitter: 0.5, ..b };
        for _ in 0..100 {
            let d = j.delay(3);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }
}
