//! Placement: which engine of a fleet a worker goes to.
//!
//! Two decisions, both pure functions of what the supervisor knows, so they are tested alone:
//!
//! - [`spread`]: a new or restarted worker goes to the least-loaded usable engine (workers
//!   running or starting there, relative to its capacity), preferring the engine its slot ran on
//!   before (a worker that crashed on a healthy engine is replaced there). An engine at its
//!   capacity, or down, takes nothing; one at its start-up concurrency waits for a launch to
//!   finish.
//! - [`home`]: a session id's home engine, by OpenWhisk's scheme: a stable hash picks a first
//!   engine and a step coprime with the number of engines, and the engines are tried along that
//!   walk. The walk visits every engine once, and a session's home moves only when its engine
//!   is down (to the next on its own walk, not to one shared by every session of that engine).

/// What placement knows of one engine of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// The engine is up and ready for this pool (swept, image in place).
    pub usable: bool,
    /// The pool's workers on it, running or starting.
    pub workers: usize,
    /// The pool's launches under way on it.
    pub launching: usize,
    /// Its capacity for this pool (`None`: unlimited).
    pub capacity: Option<usize>,
    /// Its start-up concurrency (`None`: unlimited).
    pub startup_concurrency: Option<usize>,
}

impl Load {
    fn has_room(&self) -> bool {
        self.usable && self.capacity.is_none_or(|c| self.workers < c)
    }

    fn may_launch(&self) -> bool {
        self.startup_concurrency.is_none_or(|c| self.launching < c)
    }

    /// Its fill, for comparison: workers per unit of capacity (unlimited engines count their
    /// workers against a capacity of a million).
    fn fill(&self) -> f64 {
        self.workers as f64 / self.capacity.unwrap_or(1_000_000).max(1) as f64
    }
}

/// Where a worker goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// To the engine at this index.
    Engine(usize),
    /// Engines have room but each has as many launches under way as it allows: wait for one
    /// to finish.
    Busy,
    /// No usable engine has room: wait for one to come up or free a place.
    Nowhere,
}

/// The engine for a worker, given each engine's load; `prefer` is the engine its slot ran on.
pub fn spread(loads: &[Load], prefer: Option<usize>) -> Choice {
    if let Some(i) = prefer.filter(|&i| loads.get(i).is_some_and(Load::has_room)) {
        if loads[i].may_launch() {
            return Choice::Engine(i);
        }
    }
    let with_room: Vec<usize> = (0..loads.len()).filter(|&i| loads[i].has_room()).collect();
    if with_room.is_empty() {
        return Choice::Nowhere;
    }
    with_room
        .into_iter()
        .filter(|&i| loads[i].may_launch())
        .min_by(|&a, &b| {
            // Least filled, then fewest workers (unlimited engines), then the first listed.
            let (la, lb) = (&loads[a], &loads[b]);
            la.fill()
                .total_cmp(&lb.fill())
                .then(la.workers.cmp(&lb.workers))
                .then(a.cmp(&b))
        })
        .map_or(Choice::Busy, Choice::Engine)
}

/// The home engine of session `key` among `n` engines, skipping those `usable` rejects; `None`
/// if none is usable.
pub fn home(key: &str, n: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let hash = fnv1a(key.as_bytes());
    let steps: Vec<usize> = (1..=n).filter(|&s| gcd(s, n) == 1).collect();
    let step = steps[(hash / n as u64) as usize % steps.len()];
    let first = (hash % n as u64) as usize;
    (0..n).map(|k| (first + k * step) % n).find(|&i| usable(i))
}

/// 64-bit FNV-1a: stable across platforms and compiler versions (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(workers: usize) -> Load {
        Load {
            usable: true,
            workers,
            ..Load::default()
        }
    }

    #[test]
    fn spreads_evenly_then_by_capacity() {
        let mut loads = vec![up(0), up(0)];
        let mut placed = [0, 0];
        for _ in 0..6 {
            let Choice::Engine(i) = spread(&loads, None) else {
                panic!("room everywhere")
            };
            loads[i].workers += 1;
            placed[i] += 1;
        }
        assert_eq!(placed, [3, 3]);
        loads[0].capacity = Some(3);
        assert_eq!(spread(&loads, Some(0)), Choice::Engine(1));
        loads[1].capacity = Some(3);
        assert_eq!(spread(&loads, None), Choice::Nowhere);
    }

    #[test]
    fn prefers_the_slot_engine_and_skips_unusable_ones() {
        let mut loads = vec![up(1), up(3)];
        assert_eq!(spread(&loads, Some(1)), Choice::Engine(1));
        loads[1].usable = false;
        assert_eq!(spread(&loads, Some(1)), Choice::Engine(0));
        loads[0].usable = false;
        assert_eq!(spread(&loads, None), Choice::Nowhere);
    }

    #[test]
    fn startup_concurrency_makes_callers_wait() {
        let mut loads = vec![up(0)];
        loads[0].startup_concurrency = Some(1);
        loads[0].launching = 1;
        assert_eq!(spread(&loads, None), Choice::Busy);
        assert_eq!(spread(&loads, Some(0)), Choice::Busy);
    }

    #[test]
    fn home_is_stable_and_moves_only_off_a_down_engine() {
        let n = 5;
        let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
        let homes: Vec<usize> = keys.iter().map(|k| home(k, n, |_| true).unwrap()).collect();
        // Every engine is someone's home.
        for e in 0..n {
            assert!(homes.contains(&e), "engine {e} is nobody's home");
        }
        // Engine 2 down: only its sessions move, and not all to one engine.
        let moved: Vec<usize> = keys
            .iter()
            .zip(&homes)
            .map(|(k, &h)| {
                let now = home(k, n, |i| i != 2).unwrap();
                if h != 2 {
                    assert_eq!(now, h, "{k} moved off a healthy engine");
                }
                now
            })
            .collect();
        let targets: std::collections::HashSet<usize> = homes
            .iter()
            .zip(&moved)
            .filter(|(h, _)| **h == 2)
            .map(|(_, m)| *m)
            .collect();
        assert!(
            targets.len() > 1,
            "every session of engine 2 moved to one engine"
        );
        assert_eq!(home("x", n, |_| false), None);
    }
}
