//! The seed's idle backoff: sleep longer while nothing is due, start over after work.

use std::time::Duration;

/// The seed's schedule, by backoff index: 0.25 s doubling up to 10 s.
const SCHEDULE_MS: [u64; 7] = [250, 500, 1_000, 2_000, 4_000, 8_000, 10_000];

/// Which sleep comes after each poll, capped at the configured poll interval.
#[derive(Clone, Debug)]
pub struct Backoff {
    index: usize,
    cap: Duration,
}

impl Backoff {
    pub fn new(poll_interval: Duration) -> Self {
        Self {
            index: 0,
            cap: poll_interval,
        }
    }

    /// The sleep after a poll that found runs (`true`) or found none / failed (`false`).
    pub fn after_poll(&mut self, found_runs: bool) -> Duration {
        if found_runs {
            self.index = 0;
        } else {
            self.index = (self.index + 1).min(SCHEDULE_MS.len() - 1);
        }
        let step = Duration::from_millis(SCHEDULE_MS[self.index]);
        // Past the seed's own schedule the configured interval is the steady state.
        let step = if self.index == SCHEDULE_MS.len() - 1 {
            self.cap
        } else {
            step
        };
        step.min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn follows_the_seed_schedule() {
        let mut b = Backoff::new(Duration::from_secs(10));
        let idle: Vec<f64> = (0..8).map(|_| secs(b.after_poll(false))).collect();
        assert_eq!(idle, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]);
        assert_eq!(secs(b.after_poll(true)), 0.25);
        assert_eq!(secs(b.after_poll(false)), 0.5);
    }

    #[test]
    fn capped_by_the_poll_interval() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let idle: Vec<f64> = (0..5).map(|_| secs(b.after_poll(false))).collect();
        assert_eq!(idle, [0.5, 1.0, 1.0, 1.0, 1.0]);
        let mut b = Backoff::new(Duration::from_secs(30));
        let idle: Vec<f64> = (0..7).map(|_| secs(b.after_poll(false))).collect();
        assert_eq!(idle, [0.5, 1.0, 2.0, 4.0, 8.0, 30.0, 30.0]);
    }
}
