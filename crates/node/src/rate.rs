//! Token buckets per app and per peer: a flood from one caller is refused
//! with `RESOURCE_EXHAUSTED` while everyone else is served.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// One bucket per key, refilled at `rate` tokens per second up to `rate`
/// (one second of burst). A rate of 0 means unlimited.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(per_sec: u64) -> Self {
        Self {
            rate: per_sec as f64,
            buckets: Mutex::default(),
        }
    }

    /// Takes `n` tokens from `key`'s bucket; false when there are not
    /// enough. More than a second's worth at once is taken from a full
    /// bucket, which goes into debt (paid back before anything else
    /// passes): a transfer batch larger than a low rate is slowed to it,
    /// never refused for good.
    pub(crate) fn allow(&self, key: &str, n: usize) -> bool {
        self.with_bucket(key, |tokens, rate| {
            if *tokens >= (n as f64).min(rate) {
                *tokens -= n as f64;
                true
            } else {
                false
            }
        })
        .unwrap_or(true)
    }

    /// Settles a call after the fact: takes `n` more tokens from `key`'s
    /// bucket (into debt, if need be) for work the call wasted, or gives
    /// back `-n` (never past a full bucket) for a call that turned out to
    /// cost nothing of its own.
    pub(crate) fn settle(&self, key: &str, n: i64) {
        if n != 0 {
            self.with_bucket(key, |tokens, rate| *tokens = (*tokens - n as f64).min(rate));
        }
    }

    /// Runs `f` on `key`'s bucket (tokens, rate), refilled to now; None
    /// when unlimited.
    fn with_bucket<T>(&self, key: &str, f: impl FnOnce(&mut f64, f64) -> T) -> Option<T> {
        if self.rate <= 0.0 {
            return None;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        Some(f(tokens, self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_at_the_rate_and_others_are_untouched() {
        let l = RateLimiter::new(10);
        let granted = (0..100).filter(|_| l.allow("flood", 1)).count();
        assert!((10..=11).contains(&granted), "{granted}");
        assert!(l.allow("quiet", 1));
        assert!(RateLimiter::new(0).allow("any", 1_000_000));
    }

    #[test]
    fn a_settled_call_takes_more_or_gives_back_but_never_past_full() {
        let l = RateLimiter::new(10);
        assert!(l.allow("app", 1));
        l.settle("app", -5);
        let granted = (0..100).filter(|_| l.allow("app", 1)).count();
        assert!(
            (10..=11).contains(&granted),
            "a refund never fills past the rate: {granted}"
        );
        let l = RateLimiter::new(10);
        assert!(l.allow("app", 1));
        l.settle("app", 30);
        assert!(!l.allow("app", 1), "wasted work is paid back first");
        RateLimiter::new(0).settle("any", 1_000_000);
    }

    #[test]
    fn more_than_a_second_at_once_passes_a_full_bucket_and_is_paid_back() {
        let l = RateLimiter::new(100);
        assert!(l.allow("big", 256), "a full bucket takes a batch over the rate");
        assert!(!l.allow("big", 1), "then the debt is paid back first");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !l.allow("big", 1),
            "156 tokens of debt take over a second to repay"
        );
    }
}
