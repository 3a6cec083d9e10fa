//! How many warm containers the pool should hold: `min_idle` plus the
//! signups expected while a container warms (the recent signup rate × the
//! recent warm time, with a margin), never above `max_idle`.

use std::time::Duration;

use crate::app::App;
use crate::error::Result;

/// The signup rate is the count over this trailing window: a burst lifts
/// the target within a second or two, and it falls back as soon as the
/// burst has passed the window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Safety margin over the mean (arrivals come in bursts, not evenly).
const BURST_FACTOR: f64 = 1.5;
/// Warm time assumed before any container has warmed.
const DEFAULT_WARM_SECS: f64 = 2.0;

/// The pool target for the given settings, rate and warm time.
pub fn target(min_idle: i64, max_idle: i64, rate_per_sec: f64, warm_secs: f64) -> i64 {
    // Rounded, not ceiled: one signup now and then (0.1/s over the window)
    // should not hold a container more.
    let extra = (rate_per_sec.max(0.0) * warm_secs.max(0.0) * BURST_FACTOR).round();
    let extra = if extra.is_finite() { extra as i64 } else { 0 };
    (min_idle + extra).min(max_idle).max(min_idle.min(max_idle))
}

/// Signups per second over the trailing window, counted in the database so
/// that signups served by every scheduler count.
pub async fn signup_rate(app: &App) -> Result<f64> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE created_at > now() - make_interval(secs => $1)",
    )
    .bind(RATE_WINDOW.as_secs_f64())
    .fetch_one(&app.db)
    .await?;
    Ok(count as f64 / RATE_WINDOW.as_secs_f64())
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
        // One signup in the window adds nothing.
        assert_eq!(target(5, 20, 0.1, 2.0), 5);
        // 5 signups/s while containers take 2 s to warm: 15 more.
        assert_eq!(target(5, 20, 5.0, 2.0), 20);
        assert_eq!(target(5, 20, 1.0, 2.0), 8);
        assert_eq!(target(5, 20, 100.0, 2.0), 20);
        assert_eq!(target(0, 0, 3.0, 2.0), 0);
        // A misconfigured min above max never overshoots max.
        assert_eq!(target(30, 20, 0.0, 2.0), 20);
        assert_eq!(target(5, 20, f64::NAN, 2.0), 5);
    }
}
