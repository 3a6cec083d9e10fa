//! AI credits, held before a request goes upstream and settled after, so
//! that a balance never goes below zero however many requests and proxies
//! spend it at once (check-then-record overshoots: every request checks
//! the same balance before any records).
//!
//! Each proxy leases credits from an account's balance: one conditional
//! `UPDATE` moves an amount out of `credit_balances` into the proxy's row
//! in `credit_leases`, never more than is there. Requests hold their worst
//! case against the lease in memory, and settle to their real cost; what a
//! lease spent is written with the usage events (`usage.rs`), in the same
//! transaction. A lease idle for a while, and every lease at shutdown, is
//! returned (what it did not spend goes back to the balance); a proxy that
//! died leaves leases that expire, and whichever proxy flushes next puts
//! their unspent part back. Leases are renewed on every flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ProxyError, Result};
use crate::money::{db_int, Micros};

/// A proxy's current lease on one account, as this proxy knows it.
#[derive(Debug)]
struct Lease {
    id: Uuid,
    /// What the lease took from the balance.
    amount: u64,
    /// Settled charges against it (flushed or not).
    charged: u64,
    /// Holds outstanding.
    held: u64,
    last_used: Instant,
}

impl Lease {
    fn available(&self) -> u64 {
        self.amount.saturating_sub(self.charged + self.held)
    }
}

#[derive(Default)]
struct Account {
    lease: Option<Lease>,
}

/// Credits set aside for one request.
#[derive(Debug)]
pub struct Hold {
    pub user_id: Uuid,
    pub lease_id: Uuid,
    pub amount: Micros,
    /// Less than the request's worst case: its output must be capped.
    pub partial: bool,
}

pub struct Ledger {
    db: PgPool,
    proxy_id: String,
    lease_ttl: Duration,
    /// The most a lease grows by beyond what the request needs.
    chunk: Micros,
    accounts: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Account>>>>,
}

/// A lease handed back: its id (the flush returns its unspent part).
pub struct Returned(pub Uuid);

impl Ledger {
    pub fn new(db: PgPool, proxy_id: String, lease_ttl: Duration, chunk: Micros) -> Self {
        Self {
            db,
            proxy_id,
            lease_ttl,
            chunk,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// A handle on every account this proxy knows, taken under the map's
    /// lock and used after it.
    fn every_account(&self) -> Vec<Arc<tokio::sync::Mutex<Account>>> {
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn account(&self, user_id: Uuid) -> Arc<tokio::sync::Mutex<Account>> {
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user_id)
            .or_default()
            .clone()
    }

    /// Holds `want` (the request's worst case) or, when the account has
    /// less but at least `min`, all it has (`partial`). Fewer than `min`:
    /// `InsufficientCredits` with what there is.
    pub async fn hold(&self, user_id: Uuid, want: Micros, min: Micros) -> Result<Hold> {
        let account = self.account(user_id);
        let mut account = account.lock().await;
        let have = account.lease.as_ref().map_or(0, Lease::available);
        if have < want.0 {
            self.grow(user_id, &mut account, want.0 - have).await?;
        }
        let lease = match account.lease.as_mut() {
            Some(l) if l.available() >= min.0.max(1) => l,
            other => {
                let balance = other.map_or(0, |l| l.available());
                return Err(ProxyError::InsufficientCredits {
                    balance: Micros(balance),
                });
            }
        };
        let amount = want.0.min(lease.available());
        lease.held += amount;
        lease.last_used = Instant::now();
        metrics::gauge!("clawdeploy_llm_holds_outstanding_micros").increment(amount as f64);
        Ok(Hold {
            user_id,
            lease_id: lease.id,
            amount: Micros(amount),
            partial: amount < want.0,
        })
    }

    /// Moves up to `need` more (or a quarter of the balance, up to the
    /// chunk, when that is more) from the balance into this proxy's lease.
    async fn grow(&self, user_id: Uuid, account: &mut Account, need: u64) -> Result<()> {
        for _ in 0..2 {
            let (id, fresh) = match &account.lease {
                Some(l) => (l.id, false),
                None => (Uuid::new_v4(), true),
            };
            let (taken, lease_amount, known): (Option<i64>, Option<i64>, bool) = sqlx::query_as(
                "WITH t AS (
                   SELECT user_id, LEAST(balance_micros, GREATEST($2::bigint, LEAST(balance_micros / 4, $3::bigint))) AS amount
                     FROM credit_balances
                    WHERE user_id = $1 AND balance_micros > 0
                      AND ($6::bool OR EXISTS (SELECT 1 FROM credit_leases WHERE id = $4))
                      FOR UPDATE
                 ), b AS (
                   UPDATE credit_balances c SET balance_micros = c.balance_micros - t.amount, updated_at = now()
                     FROM t WHERE c.user_id = t.user_id
                   RETURNING t.amount
                 ), l AS (
                   INSERT INTO credit_leases (id, user_id, proxy_id, amount_micros, expires_at)
                   SELECT $4, $1, $5, amount, now() + make_interval(secs => $7) FROM b
                   ON CONFLICT (id) DO UPDATE
                      SET amount_micros = credit_leases.amount_micros + excluded.amount_micros,
                          expires_at = excluded.expires_at
                   RETURNING amount_micros
                 )
                 SELECT (SELECT amount FROM b), (SELECT amount_micros FROM l),
                        $6::bool OR EXISTS (SELECT 1 FROM credit_leases WHERE id = $4)",
            )
            .bind(user_id)
            .bind(db_int(need))
            .bind(db_int(self.chunk.0))
            .bind(id)
            .bind(&self.proxy_id)
            .bind(fresh)
            .bind(self.lease_ttl.as_secs_f64())
            .fetch_one(&self.db)
            .await?;
            match (taken, lease_amount) {
                (Some(taken), Some(total)) if known => {
                    metrics::counter!("clawdeploy_llm_lease_micros_total", "direction" => "taken")
                        .increment(taken as u64);
                    match account.lease.as_mut() {
                        Some(l) => l.amount = total as u64,
                        None => {
                            account.lease = Some(Lease {
                                id,
                                amount: total as u64,
                                charged: 0,
                                held: 0,
                                last_used: Instant::now(),
                            })
                        }
                    }
                    return Ok(());
                }
                // An empty balance: nothing to take.
                _ if known => return Ok(()),
                // The lease is gone (it expired while this proxy could not
                // renew it, and its unspent part went back): start another.
                _ => {
                    tracing::warn!(%user_id, lease = %id, "a credit lease was lost; taking a new one");
                    account.lease = None;
                }
            }
        }
        Ok(())
    }

    /// Ends `hold` having charged `cost` (at most the hold: a request is
    /// never charged more than was set aside for it). Returns the charge.
    /// The caller records the usage event, with this charge, before this.
    pub async fn settle(&self, hold: &Hold, cost: Micros) -> Micros {
        let charge = cost.min(hold.amount);
        let account = self.account(hold.user_id);
        let mut account = account.lock().await;
        metrics::gauge!("clawdeploy_llm_holds_outstanding_micros").decrement(hold.amount.0 as f64);
        if let Some(l) = account.lease.as_mut().filter(|l| l.id == hold.lease_id) {
            l.held = l.held.saturating_sub(hold.amount.0);
            l.charged += charge.0;
            l.last_used = Instant::now();
        }
        charge
    }

    /// Takes this proxy's leases idle for `idle` (every lease with no hold
    /// when `idle` is zero) out of use; the flush returns them.
    pub async fn retire_idle(&self, idle: Duration) -> Vec<Returned> {
        let accounts = self.every_account();
        let mut out = Vec::new();
        for a in accounts {
            let mut a = a.lock().await;
            let done = a
                .lease
                .as_ref()
                .is_some_and(|l| l.held == 0 && l.last_used.elapsed() >= idle);
            if done {
                if let Some(l) = a.lease.take() {
                    out.push(Returned(l.id));
                }
            }
        }
        // Accounts with no lease left are forgotten, unless a request holds
        // one (under the map's lock nobody can take a new handle, so a
        // handle count of one means no request has it).
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, a| {
                Arc::strong_count(a) > 1 || a.try_lock().map_or(true, |a| a.lease.is_some())
            });
        out
    }

    /// Marks the leases the database no longer has (expired and recovered
    /// while this proxy was cut off) as lost, so no hold uses them again.
    pub async fn forget(&self, lost: &[Uuid]) {
        let accounts = self.every_account();
        for a in accounts {
            let mut a = a.lock().await;
            if a.lease.as_ref().is_some_and(|l| lost.contains(&l.id)) {
                if let Some(l) = a.lease.as_mut() {
                    // Holds outstanding settle against nothing; nothing
                    // new is held against it.
                    l.amount = l.charged + l.held;
                }
            }
        }
    }

    /// The ids of the leases this proxy holds now.
    pub async fn live(&self) -> Vec<Uuid> {
        let accounts = self.every_account();
        let mut ids = Vec::new();
        for a in accounts {
            if let Some(l) = &a.lock().await.lease {
                ids.push(l.id);
            }
        }
        ids
    }

    /// Waits (up to `most`) until no request holds credits.
    pub async fn wait_for_holds(&self, most: Duration) {
        let until = Instant::now() + most;
        while Instant::now() < until {
            let accounts = self.every_account();
            let mut held = 0;
            for a in accounts {
                held += a.lock().await.lease.as_ref().map_or(0, |l| l.held);
            }
            if held == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }
}
