//! Usage lands in PostgreSQL in batches: each request's event waits in
//! memory and a flush every few seconds writes all of them in one
//! transaction, with the month's rollup per instance, model and way of
//! paying, and what each credit lease spent. Event ids are the proxy's, so
//! a flush retried after a lost commit inserts nothing twice; a proxy
//! killed outright loses at most the events of one window, and never
//! charges one twice. The same transaction renews this proxy's leases,
//! returns the ones it retired and recovers the expired leases of proxies
//! that died (`ledger.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::ledger::{Ledger, Returned};
use crate::money::{db_int, Micros};

/// How a request was paid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayMode {
    /// The customer's own key: metered for display, not charged.
    Byok,
    /// The platform's upstream, charged to AI credits.
    Credits,
}

impl PayMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PayMode::Byok => "byok",
            PayMode::Credits => "credits",
        }
    }
}

/// One model request's usage.
#[derive(Clone, Debug)]
pub struct UsageEvent {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub pay_mode: PayMode,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub charged: Micros,
    /// The upstream never said: the estimate was charged.
    pub estimated: bool,
    pub lease_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

/// Events waiting beyond this many are a flush that keeps failing: the
/// oldest are dropped (counted), so memory stays bounded.
const MAX_WAITING: usize = 1_000_000;

pub struct Recorder {
    db: PgPool,
    waiting: Mutex<Vec<UsageEvent>>,
    /// Leases retired but not yet returned (a failed flush keeps them).
    returning: Mutex<Vec<Uuid>>,
    last_flush: Mutex<Instant>,
}

impl Recorder {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            waiting: Mutex::new(Vec::new()),
            returning: Mutex::new(Vec::new()),
            last_flush: Mutex::new(Instant::now()),
        }
    }

    pub fn record(&self, event: UsageEvent) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_WAITING {
            w.remove(0);
            metrics::counter!("clawdeploy_llm_usage_dropped_total").increment(1);
        }
        w.push(event);
    }

    /// Seconds since the last flush that succeeded.
    pub fn lag(&self) -> Duration {
        self.last_flush
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Writes every waiting event, renews `ledger`'s leases and returns
    /// `retired` ones, in one transaction. On failure the events and
    /// leases stay for the next flush.
    pub async fn flush(
        &self,
        ledger: &Ledger,
        retired: Vec<Returned>,
    ) -> Result<usize, sqlx::Error> {
        let events = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        let returning = {
            let mut r = self.returning.lock().unwrap_or_else(|e| e.into_inner());
            r.extend(retired.into_iter().map(|Returned(id)| id));
            r.clone()
        };
        let live = ledger.live().await;
        let started = Instant::now();
        match self.write(ledger, &events, &returning, &live).await {
            Ok(lost) => {
                metrics::histogram!("clawdeploy_llm_flush_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("clawdeploy_llm_flush_events").record(events.len() as f64);
                self.returning
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|id| !returning.contains(id));
                *self.last_flush.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                if !lost.is_empty() {
                    ledger.forget(&lost).await;
                }
                Ok(events.len())
            }
            Err(e) => {
                metrics::counter!("clawdeploy_llm_flush_failures_total").increment(1);
                let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let newer = std::mem::replace(&mut *w, events);
                w.extend(newer);
                Err(e)
            }
        }
    }

    /// The flush's transaction; returns the live leases the database no
    /// longer has.
    async fn write(
        &self,
        ledger: &Ledger,
        events: &[UsageEvent],
        returning: &[Uuid],
        live: &[Uuid],
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        if !events.is_empty() {
            let col = |f: fn(&UsageEvent) -> i64| events.iter().map(f).collect::<Vec<i64>>();
            let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
            let instances: Vec<Uuid> = events.iter().map(|e| e.instance_id).collect();
            let users: Vec<Uuid> = events.iter().map(|e| e.user_id).collect();
            let models: Vec<&str> = events.iter().map(|e| e.model.as_str()).collect();
            let modes: Vec<&str> = events.iter().map(|e| e.pay_mode.as_str()).collect();
            let estimated: Vec<bool> = events.iter().map(|e| e.estimated).collect();
            let leases: Vec<Option<Uuid>> = events.iter().map(|e| e.lease_id).collect();
            let at: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
            sqlx::query(
                "WITH ev AS (
                   SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                                        $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[],
                                        $10::bool[], $11::uuid[], $12::timestamptz[])
                          AS e(id, instance_id, user_id, model, pay_mode, input_tokens, cached_input_tokens,
                               output_tokens, charged_micros, estimated, lease_id, at)
                 ), ins AS (
                   INSERT INTO llm_usage_events
                   SELECT id, instance_id, user_id, model, pay_mode, input_tokens, cached_input_tokens,
                          output_tokens, charged_micros, estimated, lease_id, at FROM ev
                   ON CONFLICT (id) DO NOTHING
                   RETURNING *
                 ), rollup AS (
                   INSERT INTO llm_usage_monthly AS m (instance_id, month, model, pay_mode, user_id, messages,
                          input_tokens, cached_input_tokens, output_tokens, charged_micros)
                   SELECT instance_id, date_trunc('month', at AT TIME ZONE 'UTC')::date, model, pay_mode, user_id,
                          count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(charged_micros)
                     FROM ins GROUP BY 1, 2, 3, 4, 5
                   ON CONFLICT (instance_id, month, model, pay_mode) DO UPDATE
                      SET messages = m.messages + excluded.messages,
                          input_tokens = m.input_tokens + excluded.input_tokens,
                          cached_input_tokens = m.cached_input_tokens + excluded.cached_input_tokens,
                          output_tokens = m.output_tokens + excluded.output_tokens,
                          charged_micros = m.charged_micros + excluded.charged_micros
                 )
                 UPDATE credit_leases l SET spent_micros = l.spent_micros + s.total
                   FROM (SELECT lease_id, sum(charged_micros) AS total FROM ins
                          WHERE lease_id IS NOT NULL GROUP BY lease_id) s
                  WHERE l.id = s.lease_id",
            )
            .bind(&ids)
            .bind(&instances)
            .bind(&users)
            .bind(&models)
            .bind(&modes)
            .bind(col(|e| db_int(e.input_tokens)))
            .bind(col(|e| db_int(e.cached_input_tokens)))
            .bind(col(|e| db_int(e.output_tokens)))
            .bind(col(|e| db_int(e.charged.0)))
            .bind(&estimated)
            .bind(&leases)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        }
        // This proxy's leases stay alive; the ones it no longer uses go
        // back, with the expired leases of proxies that died.
        let renewed: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE credit_leases SET expires_at = now() + make_interval(secs => $2)
              WHERE id = ANY($1) RETURNING id",
        )
        .bind(live)
        .bind(ledger.lease_ttl().as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        let returned: Vec<(Uuid, i64)> = sqlx::query_as(
            "WITH gone AS (
               DELETE FROM credit_leases WHERE id = ANY($1) OR expires_at < now()
               RETURNING user_id, amount_micros - spent_micros AS left_micros, id = ANY($1) AS ours
             ), back AS (
               UPDATE credit_balances b SET balance_micros = b.balance_micros + g.left_micros, updated_at = now()
                 FROM (SELECT user_id, sum(left_micros) AS left_micros FROM gone GROUP BY user_id) g
                WHERE b.user_id = g.user_id
             )
             SELECT user_id, left_micros FROM gone WHERE NOT ours",
        )
        .bind(returning)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        for (user_id, left) in &returned {
            tracing::info!(%user_id, left_micros = left, "recovered an expired credit lease");
            metrics::counter!("clawdeploy_llm_leases_recovered_total").increment(1);
        }
        Ok(live
            .iter()
            .filter(|id| !renewed.contains(id))
            .copied()
            .collect())
    }
}

/// Flushes every `every` until `shutdown`; then retires every lease and
/// flushes once more (retrying a few times), so nothing is left behind.
pub async fn run(
    recorder: Arc<Recorder>,
    ledger: Arc<Ledger>,
    every: Duration,
    idle_lease: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let retired = ledger.retire_idle(idle_lease).await;
                if let Err(e) = recorder.flush(&ledger, retired).await {
                    tracing::warn!(error = %e, "usage flush failed; kept for the next");
                }
                metrics::gauge!("clawdeploy_llm_flush_lag_seconds").set(recorder.lag().as_secs_f64());
            }
            _ = &mut shutdown => break,
        }
    }
    for attempt in 0..5 {
        let retired = ledger.retire_idle(Duration::ZERO).await;
        match recorder.flush(&ledger, retired).await {
            Ok(n) => {
                tracing::info!(events = n, "usage flushed and leases returned at shutdown");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "the last usage flush failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tracing::error!("usage not flushed at shutdown; its leases expire and come back");
}
