//! Capped exponential backoff, optionally jittered: the one retry delay of
//! every loop that reconnects or retries.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    /// Adds up to half the delay at random, so that many clients that lost
    /// the same server do not come back in step.
    jitter: bool,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
            jitter: false,
        }
    }

    pub fn jittered(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The delay to wait now; the one after it doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            let half = u64::try_from((base / 2).as_millis()).unwrap_or(u64::MAX);
            base + Duration::from_millis(rand::random::<u64>() % (half + 1))
        } else {
            base
        }
    }

    /// Sleeps for `next_delay()`.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Sleeps for the current delay, and lets the next one double up to
    /// `cap` only: where one loop waits longer after some failures than
    /// after others.
    pub async fn wait_capped(&mut self, cap: Duration) {
        let delay = self.next_delay();
        self.next = self.next.min(cap.max(self.initial));
        tokio::time::sleep(delay).await;
    }

    /// After a success: the next failure waits the initial delay again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let seen: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_wait_bounds_the_next_delay() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(30_000));
        b.wait_capped(ms(150)).await;
        assert_eq!(b.next_delay(), ms(150));
    }

    #[test]
    fn jitter_adds_at_most_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(1000), ms(1000)).jittered();
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d >= ms(1000) && d <= ms(1500), "{d:?}");
        }
    }
}
