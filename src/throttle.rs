//! Rate limits for log lines that a fault can repeat thousands of times a second (a downstream
//! that keeps nacking, a store that stays away, a stream of messages without a key): the first
//! line is written at once, later ones at most once per period, each saying how many were
//! suppressed since the last. Counters, not log lines, carry the exact numbers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rate-limited log site.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(suppressed)` when a line may be written now (with how many were held back since
    /// the last one), `None` when this one is to be suppressed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting; the counts stay usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }

    /// Starts over: the next line is written at once (e.g. after the fault cleared).
    pub fn reset(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = State::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_passes_then_one_per_period_with_the_suppressed_count() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.allow_at(start), Some(0));
        assert_eq!(t.allow_at(start + Duration::from_secs(1)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(9)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(10)), Some(2));
        assert_eq!(t.allow_at(start + Duration::from_secs(11)), None);
        t.reset();
        assert_eq!(t.allow_at(start + Duration::from_secs(12)), Some(0));
    }
}
