//! The retry policy, kept pure so it can be tested without a clock.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
    /// How long a message may stay queued before its pending recipients fail.
    pub lifetime: Duration,
}

impl Default for RetryPolicy {
    /// Postfix-like: 5 minutes doubling to 1 hour, give up after 5 days.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(300),
            max: Duration::from_secs(3600),
            lifetime: Duration::from_secs(5 * 86400),
        }
    }
}

impl RetryPolicy {
    /// When to try again after `attempts` failed attempts (1 = the first failure).
    ///
    /// `jitter` in `[0, 1)` spreads retries of messages that failed together by up to 25% of the
    /// delay, so a recovering destination is not hit by all of them at once.
    pub fn next_attempt_ms(&self, attempts: u32, now_ms: u64, jitter: f64) -> u64 {
        let shift = attempts.saturating_sub(1).min(32);
        let base = self
            .initial
            .as_millis()
            .saturating_mul(1u128 << shift)
            .min(self.max.as_millis()) as u64;
        let extra = (base as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as u64;
        now_ms.saturating_add(base.saturating_add(extra).min(self.max.as_millis() as u64))
    }

    /// Whether a message that arrived at `arrival_ms` has outlived the queue lifetime.
    pub fn expired(&self, arrival_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(arrival_ms) >= self.lifetime.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_attempt_ms(1, 0, 0.0), 300_000);
        assert_eq!(p.next_attempt_ms(2, 0, 0.0), 600_000);
        assert_eq!(p.next_attempt_ms(3, 0, 0.0), 1_200_000);
        assert_eq!(p.next_attempt_ms(4, 0, 0.0), 2_400_000);
        assert_eq!(p.next_attempt_ms(5, 0, 0.0), 3_600_000);
        assert_eq!(p.next_attempt_ms(500, 0, 0.99), 3_600_000);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let p = RetryPolicy::default();
        let t = p.next_attempt_ms(1, 1000, 0.999);
        assert!(t > 1000 + 300_000 && t <= 1000 + 375_000);
    }

    #[test]
    fn lifetime() {
        let p = RetryPolicy::default();
        assert!(!p.expired(0, 5 * 86_400_000 - 1));
        assert!(p.expired(0, 5 * 86_400_000));
    }
}
