//! Signups claiming on this scheduler right now. While any is in flight,
//! and for a short settle after the last one answered, the pool manager
//! holds its refills back: a burst's claims come first, then the
//! customers' first requests to their new gateways, and the pool catches up
//! after. Warm claims wait here for their batch (`WarmClaims`;
//! `lifecycle::claim` runs the batches).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::batch::Batcher;
use crate::model::{InstanceStatus, RouteVersion, Tier};

/// What a waiting signup needs of its instance once it settled: its
/// status, its own route's version (to wait for the edges) and its
/// container with the sealed gateway token (a retried claim moved it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub status: InstanceStatus,
    pub route_version: Option<RouteVersion>,
    pub container: Option<(Uuid, Vec<u8>)>,
}

/// News that an instance settled (ready or failed), for the signups
/// waiting on it. A completion on this scheduler carries what it committed,
/// so the waiter answers without reading it back (a burst of 100 is 100
/// reads fewer, each waiting for a connection at the busiest moment); news
/// from elsewhere (another scheduler's completion, a failed claim) carries
/// none, and the waiter reads the database.
#[derive(Clone, Debug)]
pub struct InstanceNews {
    pub instance_id: Uuid,
    pub settled: Option<Arc<Settled>>,
}

impl InstanceNews {
    /// News without the answer: the waiter reads it.
    pub fn read_it(instance_id: Uuid) -> Self {
        Self {
            instance_id,
            settled: None,
        }
    }
}

/// Warm claims in batches: one transaction takes an idle container for
/// every claim of the batch it can.
pub type WarmClaims = Batcher<WarmClaim, WarmOutcome>;

/// A claim waiting for its batch: the instance to write, its keys sealed.
pub struct WarmClaim {
    pub instance_id: Uuid,
    pub user_id: Uuid,
    pub subdomain: String,
    pub default_model: String,
    pub kek_id: String,
    pub wrapped_dek: Vec<u8>,
    /// Provider key names and their sealed values.
    pub keys: Vec<(String, Vec<u8>)>,
    pub idempotency_key: Option<String>,
}

/// What the batch did with one claim.
#[derive(Debug, PartialEq, Eq)]
pub enum WarmOutcome {
    /// Written, on this idle container (now `assigning`).
    Taken {
        container_id: Uuid,
        node_id: String,
        /// The account's tier, which the batch already sized the
        /// container for.
        tier: Tier,
        gateway_token_enc: Vec<u8>,
    },
    /// Not written: the account has a live instance, or the subdomain is
    /// taken or cooling down.
    Conflict(ClaimConflict),
    /// Not written: no idle container was left for it, or the batch
    /// failed; the claim goes on alone.
    Alone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimConflict {
    InstanceExists,
    SubdomainTaken,
}

/// How many signups are in flight, and when the last one left.
#[derive(Clone, Copy, Default)]
struct Flight {
    count: usize,
    last_left: Option<tokio::time::Instant>,
}

pub struct ClaimsInFlight {
    flight: watch::Sender<Flight>,
    /// How long after the last signup answered the system still counts as
    /// busy. A customer opens the new gateway right after the answer: its
    /// TLS handshake and first request should not share the cores with the
    /// container creates a refill starts (on 2 cores a refill of 88 made the
    /// first request of a 100-signup burst 30-40 ms slower).
    settle: Duration,
}

impl Default for ClaimsInFlight {
    fn default() -> Self {
        Self::new(Duration::ZERO)
    }
}

/// One signup in flight; dropping it (however the signup ends) lets it go.
pub struct InFlight<'a>(&'a ClaimsInFlight);

impl ClaimsInFlight {
    pub fn new(settle: Duration) -> Self {
        Self {
            flight: watch::Sender::new(Flight::default()),
            settle,
        }
    }

    /// Counts a signup in until the guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        self.flight.send_modify(|f| f.count += 1);
        InFlight(self)
    }

    /// Whether a signup is in flight or the last one left less than the
    /// settle ago.
    pub fn busy(&self) -> bool {
        let f = *self.flight.borrow();
        f.count > 0 || f.last_left.is_some_and(|t| t.elapsed() < self.settle)
    }

    /// Resolves once no signup is in flight and none has been for the
    /// settle.
    pub async fn quiet(&self) {
        let mut rx = self.flight.subscribe();
        loop {
            let Ok(f) = rx.wait_for(|f| f.count == 0).await.map(|f| *f) else {
                return;
            };
            let Some(until) = f.last_left.map(|t| t + self.settle) else {
                return;
            };
            if tokio::time::Instant::now() >= until {
                return;
            }
            // A signup entering meanwhile starts the wait over.
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = rx.changed() => {}
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.flight.send_modify(|f| {
            f.count = f.count.saturating_sub(1);
            if f.count == 0 {
                f.last_left = Some(tokio::time::Instant::now());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiet_waits_for_the_last_signup() {
        let claims = ClaimsInFlight::default();
        claims.quiet().await;
        let a = claims.enter();
        let b = claims.enter();
        assert!(claims.busy());
        drop(a);
        assert!(claims.busy());
        let quiet = claims.quiet();
        tokio::pin!(quiet);
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        drop(b);
        quiet.await;
        assert!(!claims.busy());
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_the_settle_after_the_last_signup_and_starts_over_on_a_new_one() {
        let settle = Duration::from_millis(100);
        let claims = ClaimsInFlight::new(settle);
        // Nothing has been in flight: quiet at once.
        assert!(!claims.busy());
        claims.quiet().await;
        drop(claims.enter());
        assert!(claims.busy());
        let quiet = claims.quiet();
        tokio::pin!(quiet);
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        // Another signup 60 ms into the settle: the settle runs from it.
        drop(claims.enter());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        assert!(claims.busy());
        tokio::time::advance(Duration::from_millis(41)).await;
        assert!(futures::poll!(quiet.as_mut()).is_ready());
        assert!(!claims.busy());
    }
}
