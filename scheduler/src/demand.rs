//! How many warm containers the pool should hold: `min_idle` plus the
//! signups expected while a container warms (an exponentially weighted
//! signup rate × the recent warm time), never above `max_idle`.

use std::time::Duration;

use crate::app::App;
use crate::error::Result;

/// Time constant of the signup-rate average: a burst lifts the target
/// within seconds and its effect fades over about a minute.
const RATE_TAU: Duration = Duration::from_secs(20);
/// Safety margin over the mean (arrivals come in bursts, not evenly).
const BURST_FACTOR: f64 = 1.5;
/// Warm time assumed before any container has warmed.
const DEFAULT_WARM_SECS: f64 = 2.0;

/// The pool target for the given settings, rate and warm time.
pub fn target(min_idle: i64, max_idle: i64, rate_per_sec: f64, warm_secs: f64) -> i64 {
    // Rounded, not ceiled: the average decays towards zero but never gets
    // there, and a signup now and then should not hold one extra forever.
    let extra = (rate_per_sec.max(0.0) * warm_secs.max(0.0) * BURST_FACTOR).round();
    let extra = if extra.is_finite() { extra as i64 } else { 0 };
    (min_idle + extra).min(max_idle).max(min_idle.min(max_idle))
}

/// The signup-rate average the pool manager keeps between passes. It counts
/// claims in the database, so it sees signups served by every scheduler.
#[derive(Debug, Default)]
pub struct SignupRate {
    rate: f64,
    /// Database time of the last count.
    since: Option<chrono::DateTime<chrono::Utc>>,
}

impl SignupRate {
    /// Folds `count` signups over `dt` seconds into the average.
    pub fn add(&mut self, count: i64, dt: f64) -> f64 {
        if dt > 0.0 {
            let alpha = 1.0 - (-dt / RATE_TAU.as_secs_f64()).exp();
            self.rate += alpha * (count as f64 / dt - self.rate);
        }
        self.rate
    }

    /// Counts the signups since the last pass and returns the new average.
    pub async fn update(&mut self, app: &App) -> Result<f64> {
        let (now, count): (chrono::DateTime<chrono::Utc>, i64) = sqlx::query_as(
            "SELECT now(), count(*) FROM instances WHERE created_at > $1 AND created_at <= now()",
        )
        .bind(self.since.unwrap_or_else(chrono::Utc::now))
        .fetch_one(&app.db)
        .await?;
        let dt = match self.since {
            Some(since) => (now - since).num_milliseconds() as f64 / 1000.0,
            None => 0.0,
        };
        self.since = Some(now);
        Ok(self.add(count, dt))
    }
}

/// Mean seconds from create to idle over the last 20 containers that warmed.
pub async fn warm_secs(app: &App) -> Result<f64> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT avg(extract(epoch FROM warm_at - created_at))::float8 FROM
           (SELECT warm_at, created_at FROM containers WHERE warm_at IS NOT NULL
             ORDER BY warm_at DESC LIMIT 20) recent",
    )
    .fetch_one(&app.db)
    .await?;
    Ok(secs.unwrap_or(DEFAULT_WARM_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_rises_with_demand_within_bounds() {
        assert_eq!(target(5, 20, 0.0, 2.0), 5);
        // One signup a minute adds nothing.
        assert_eq!(target(5, 20, 1.0 / 60.0, 2.0), 5);
        // 5 signups/s while containers take 2 s to warm: 15 more.
        assert_eq!(target(5, 20, 5.0, 2.0), 20);
        assert_eq!(target(5, 20, 1.0, 2.0), 8);
        assert_eq!(target(5, 20, 100.0, 2.0), 20);
        assert_eq!(target(0, 0, 3.0, 2.0), 0);
        // A misconfigured min above max never overshoots max.
        assert_eq!(target(30, 20, 0.0, 2.0), 20);
        assert_eq!(target(5, 20, f64::NAN, 2.0), 5);
    }

    #[test]
    fn the_rate_follows_a_burst_and_fades() {
        let mut r = SignupRate::default();
        assert_eq!(r.add(0, 1.0), 0.0);
        // 5 per second for 10 seconds.
        let mut rate = 0.0;
        for _ in 0..10 {
            rate = r.add(5, 1.0);
        }
        assert!(rate > 1.5 && rate < 5.0, "{rate}");
        // Quiet for two minutes.
        for _ in 0..120 {
            rate = r.add(0, 1.0);
        }
        assert!(rate < 0.05, "{rate}");
    }
}
