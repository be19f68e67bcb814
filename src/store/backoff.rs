//! The one retry rhythm for everything that waits on the store: 100 ms, then ×1.5 per failure,
//! capped (5 s unless a caller needs a tighter cap), back to the start after a success.

use std::time::Duration;

/// First delay after a failure.
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// `d` shortened by up to a quarter (`r` in 0..=1 picks how much), so the cap stays a cap.
pub fn jitter(d: Duration, r: f64) -> Duration {
    d.mul_f64(0.75 + 0.25 * r.clamp(0.0, 1.0))
}

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// 100 ms, ×1.5, capped at 5 s.
    pub fn new() -> Self {
        Self::capped(RETRY_MAX)
    }

    /// The same rhythm with another cap (at least [`RETRY_FIRST`]).
    pub fn capped(max: Duration) -> Self {
        Self::between(RETRY_FIRST, max)
    }

    /// The same ×1.5 rhythm from `first` (for slow, rate-limited work such as ACME orders).
    pub fn between(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max: max.max(first),
        }
    }

    /// The delay to wait now; the one after it is 1.5 times as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 3 / 2).min(self.max);
        now
    }

    /// [`Self::next_delay`] with [`jitter`]: for many clients retrying one server (agents), so
    /// they do not come back in lock-step.
    pub fn next_jittered(&mut self) -> Duration {
        jitter(self.next_delay(), rand::random::<f64>())
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for [`Self::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_three_quarters_and_the_delay() {
        let d = Duration::from_secs(4);
        assert_eq!(jitter(d, 0.0), Duration::from_secs(3));
        assert_eq!(jitter(d, 1.0), d);
        assert_eq!(jitter(d, 7.0), d);
        assert_eq!(jitter(d, -1.0), Duration::from_secs(3));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_by_half_up_to_the_cap_and_resets() {
        let cases: Vec<(Backoff, Vec<Duration>)> = vec![
            (
                Backoff::new(),
                vec![
                    ms(100),
                    ms(150),
                    ms(225),
                    Duration::from_micros(337_500),
                    Duration::from_micros(506_250),
                    Duration::from_micros(759_375),
                ],
            ),
            (
                Backoff::capped(ms(300)),
                vec![ms(100), ms(150), ms(225), ms(300), ms(300)],
            ),
            (
                Backoff::between(ms(1000), ms(2000)),
                vec![ms(1000), ms(1500), ms(2000), ms(2000)],
            ),
            // A cap below the first delay cannot make retries faster than the first delay.
            (Backoff::capped(ms(10)), vec![ms(100), ms(100)]),
        ];
        for (mut b, want) in cases {
            let got: Vec<Duration> = want.iter().map(|_| b.next_delay()).collect();
            assert_eq!(got, want);
            b.reset();
            assert_eq!(b.next_delay(), want[0], "back to the first delay");
        }
        let mut b = Backoff::new();
        for _ in 0..50 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), RETRY_MAX);
    }
}
