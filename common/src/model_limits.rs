//! Each plan's model-access limits, by tier name: the metering proxy
//! enforces them and the scheduler shows them with the plans
//! (`scheduler/src/billing/plans.rs`). Kept here, in one table, because
//! both read it and neither depends on the other.

/// What a tier may do with models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Requests a second per instance (a token bucket), and its burst.
    pub requests_per_sec: u32,
    pub burst: u32,
    /// Messages (chat completions) a month; `None`: no limit.
    pub messages_per_month: Option<u32>,
}

/// The tiers, by the name the database stores them under.
pub const TIERS: [&str; 3] = ["free", "pro", "team"];

/// The limits of `tier`; an unknown tier gets the free tier's.
pub fn of(tier: &str) -> ModelLimits {
    match tier {
        "pro" => ModelLimits {
            requests_per_sec: 20,
            burst: 40,
            messages_per_month: None,
        },
        "team" => ModelLimits {
            requests_per_sec: 50,
            burst: 100,
            messages_per_month: None,
        },
        _ => ModelLimits {
            requests_per_sec: 10,
            burst: 20,
            messages_per_month: Some(100),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paid_tiers_allow_more_and_only_the_free_one_counts_messages() {
        let [free, pro, team] = TIERS.map(of);
        assert_eq!(free.messages_per_month, Some(100));
        assert_eq!((free.requests_per_sec, free.burst), (10, 20));
        assert!(pro.messages_per_month.is_none() && team.messages_per_month.is_none());
        assert!(
            free.requests_per_sec < pro.requests_per_sec
                && pro.requests_per_sec < team.requests_per_sec
        );
        assert_eq!(of("nonsense"), free);
    }
}
