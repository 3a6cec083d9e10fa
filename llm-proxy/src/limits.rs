//! Limits per instance: a token bucket on requests (in memory, per proxy
//! process) and the free tier's messages a month (in PostgreSQL, counted
//! before the request goes upstream with one conditional upsert, so the
//! limit holds across proxies; a free account's traffic is bounded by the
//! limit itself, so this write per request stays small).

use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ProxyError, Result};

pub struct Limits {
    rate: DefaultKeyedRateLimiter<Uuid>,
    clock: DefaultClock,
    free_messages: u32,
    db: PgPool,
}

impl Limits {
    /// `per_second` requests a second with bursts of `burst`, and
    /// `free_messages` a month on the free tier.
    pub fn new(db: PgPool, per_second: NonZeroU32, burst: NonZeroU32, free_messages: u32) -> Self {
        Self {
            rate: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            clock: DefaultClock::default(),
            free_messages,
            db,
        }
    }

    pub fn free_messages(&self) -> u32 {
        self.free_messages
    }

    /// One request of `instance_id` against its bucket.
    pub fn check_rate(&self, instance_id: Uuid) -> Result<()> {
        self.rate.check_key(&instance_id).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ProxyError::RateLimited {
                retry_after: wait.max(Duration::from_secs(1)),
            }
        })
    }

    /// Forgets the buckets of instances that have not called lately (each
    /// is full again by now), so memory follows the active instances.
    pub fn sweep(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }

    /// Counts one message of a free instance this month, or refuses it.
    pub async fn take_message(&self, instance_id: Uuid, user_id: Uuid) -> Result<()> {
        let used: Option<i32> = sqlx::query_scalar(
            "INSERT INTO message_quota AS q (instance_id, month, user_id, used)
             VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, $2, 1)
             ON CONFLICT (instance_id, month) DO UPDATE SET used = q.used + 1
              WHERE q.used < $3
             RETURNING used",
        )
        .bind(instance_id)
        .bind(user_id)
        .bind(i32::try_from(self.free_messages).unwrap_or(i32::MAX))
        .fetch_optional(&self.db)
        .await?;
        match used {
            Some(_) if self.free_messages > 0 => Ok(()),
            _ => Err(ProxyError::MessageLimit {
                limit: self.free_messages,
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
