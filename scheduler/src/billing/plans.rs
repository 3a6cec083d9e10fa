//! The plans: what each tier costs, the resources its container gets, and
//! what it may do with models (`clawdeploy_common::model_limits`, the
//! table the metering proxy enforces).

use crate::model::Tier;

/// One tier's price and limits, as the product spec gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub tier: Tier,
    pub monthly_price_cents: u32,
    pub cpu_millis: u32,
    pub memory_mb: u32,
    /// The state volume's size (not enforced yet: volumes are directories).
    pub storage_gb: u32,
    pub custom_domains: bool,
}

pub const PLANS: [Plan; 3] = [
    Plan {
        tier: Tier::Free,
        monthly_price_cents: 0,
        cpu_millis: 500,
        memory_mb: 512,
        storage_gb: 5,
        custom_domains: false,
    },
    Plan {
        tier: Tier::Pro,
        monthly_price_cents: 2900,
        cpu_millis: 1000,
        memory_mb: 1024,
        storage_gb: 10,
        custom_domains: true,
    },
    Plan {
        tier: Tier::Team,
        monthly_price_cents: 7900,
        cpu_millis: 2000,
        memory_mb: 2048,
        storage_gb: 50,
        custom_domains: true,
    },
];

impl Tier {
    pub fn plan(self) -> &'static Plan {
        match self {
            Tier::Free => &PLANS[0],
            Tier::Pro => &PLANS[1],
            Tier::Team => &PLANS[2],
        }
    }
}

impl Plan {
    /// Model requests a second, burst and messages a month (the free
    /// tier's messages as `--free-messages-per-month` sets them).
    pub fn model_limits(&self, free_messages: u32) -> clawdeploy_common::model_limits::ModelLimits {
        let mut l = clawdeploy_common::model_limits::of(self.tier.as_str());
        if l.messages_per_month.is_some() {
            l.messages_per_month = Some(free_messages);
        }
        l
    }

    /// The container's memory limit, in bytes.
    pub fn memory_bytes(&self) -> i64 {
        i64::from(self.memory_mb) * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tier_finds_its_own_plan_and_the_free_one_matches_the_pool() {
        for p in &PLANS {
            assert_eq!(p.tier.plan(), p);
        }
        // Pool containers start as free ones: the same limits.
        let free = Tier::Free.plan();
        assert_eq!(
            i32::try_from(free.cpu_millis).unwrap(),
            crate::fleet::capacity::POOL_CPU_MILLIS
        );
        assert_eq!(
            free.memory_bytes(),
            crate::fleet::capacity::POOL_MEMORY_BYTES
        );
        assert!(PLANS.windows(2).all(|w| w[0].cpu_millis < w[1].cpu_millis));
    }
}
