//! Limits per instance, by its plan (`clawdeploy_common::model_limits`): a
//! token bucket on requests (in memory, per proxy process) and, on the
//! free tier, messages a month (in PostgreSQL, counted before the request
//! goes upstream with one conditional upsert, so the limit holds across
//! proxies; a free account's traffic is bounded by the limit itself, so
//! this write per request stays small).

use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ProxyError, Result};

/// A token bucket per instance, for one tier.
struct Buckets {
    tier: &'static str,
    rate: DefaultKeyedRateLimiter<Uuid>,
}

pub struct Limits {
    buckets: Vec<Buckets>,
    clock: DefaultClock,
    free_messages: u32,
    db: PgPool,
}

impl Limits {
    /// Each tier's buckets as its plan says, or `rate` (requests a second,
    /// burst) for every tier when given; `free_messages` a month on the
    /// free tier.
    pub fn new(db: PgPool, rate: Option<(NonZeroU32, NonZeroU32)>, free_messages: u32) -> Self {
        let one = NonZeroU32::MIN;
        let buckets = clawdeploy_common::model_limits::TIERS
            .iter()
            .map(|tier| {
                let plan = clawdeploy_common::model_limits::of(tier);
                let (per_second, burst) = rate.unwrap_or((
                    NonZeroU32::new(plan.requests_per_sec).unwrap_or(one),
                    NonZeroU32::new(plan.burst).unwrap_or(one),
                ));
                Buckets {
                    tier,
                    rate: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                }
            })
            .collect();
        Self {
            buckets,
            clock: DefaultClock::default(),
            free_messages,
            db,
        }
    }

    /// The month's message limit of `tier` (`None`: none).
    pub fn messages_for(&self, tier: &str) -> Option<u32> {
        clawdeploy_common::model_limits::of(tier)
            .messages_per_month
            .map(|_| self.free_messages)
    }

    fn buckets(&self, tier: &str) -> &DefaultKeyedRateLimiter<Uuid> {
        let b = self.buckets.iter().find(|b| b.tier == tier);
        // An unknown tier is held to the free tier's (the first).
        &b.unwrap_or(&self.buckets[0]).rate
    }

    /// One request of `instance_id` (on `tier`) against its bucket.
    pub fn check_rate(&self, instance_id: Uuid, tier: &str) -> Result<()> {
        self.buckets(tier)
            .check_key(&instance_id)
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                ProxyError::RateLimited {
                    retry_after: wait.max(Duration::from_secs(1)),
                }
            })
    }

    /// Forgets the buckets of instances that have not called lately (each
    /// is full again by now), so memory follows the active instances.
    pub fn sweep(&self) {
        for b in &self.buckets {
            b.rate.retain_recent();
            b.rate.shrink_to_fit();
        }
    }

    /// Counts one of `limit` messages of an instance this month, or
    /// refuses it.
    pub async fn take_message(&self, instance_id: Uuid, user_id: Uuid, limit: u32) -> Result<()> {
        let used: Option<i32> = sqlx::query_scalar(
            "INSERT INTO message_quota AS q (instance_id, month, user_id, used)
             VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, $2, 1)
             ON CONFLICT (instance_id, month) DO UPDATE SET used = q.used + 1
              WHERE q.used < $3
             RETURNING used",
        )
        .bind(instance_id)
        .bind(user_id)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_optional(&self.db)
        .await?;
        match used {
            Some(_) if limit > 0 => Ok(()),
            _ => Err(ProxyError::MessageLimit {
                limit,
                resets_at: next_month().to_rfc3339(),
            }),
        }
    }

    /// Gives back a message whose request never reached the model (the
    /// upstream failed before answering).
    pub async fn give_back_message(&self, instance_id: Uuid) {
        let r = sqlx::query(
            "UPDATE message_quota SET used = used - 1
              WHERE instance_id = $1 AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
                AND used > 0",
        )
        .bind(instance_id)
        .execute(&self.db)
        .await;
        if let Err(e) = r {
            tracing::warn!(%instance_id, error = %e, "could not give a message back");
        }
    }
}

/// The start of next month, UTC: when the free messages start again.
pub fn next_month() -> chrono::DateTime<Utc> {
    let now = Utc::now();
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: Option<(NonZeroU32, NonZeroU32)>) -> Limits {
        // The buckets need no database; the pool never connects here.
        let db = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        Limits::new(db, rate, 100)
    }

    fn burst_of(l: &Limits, tier: &str) -> usize {
        let id = Uuid::new_v4();
        (0..1000)
            .take_while(|_| l.check_rate(id, tier).is_ok())
            .count()
    }

    #[tokio::test]
    async fn each_tier_gets_its_plans_bucket_and_only_free_counts_messages() {
        let l = limits(None);
        assert_eq!(burst_of(&l, "free"), 20);
        assert_eq!(burst_of(&l, "pro"), 40);
        assert_eq!(burst_of(&l, "team"), 100);
        assert_eq!(
            burst_of(&l, "unheard-of"),
            20,
            "an unknown tier is held as free"
        );
        match l
            .check_rate(Uuid::nil(), "free")
            .and_then(|_| (0..30).try_for_each(|_| l.check_rate(Uuid::nil(), "free")))
        {
            Err(ProxyError::RateLimited { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.messages_for("free"), Some(100));
        assert_eq!(l.messages_for("pro"), None);
        let one = NonZeroU32::new(3).unwrap();
        assert_eq!(
            burst_of(&limits(Some((one, one))), "team"),
            3,
            "the flags hold every tier"
        );
    }
}
