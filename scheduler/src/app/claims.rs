//! Signups claiming on this scheduler right now. While any is in flight the
//! pool manager holds its refills back: a burst's claims come first, and
//! the pool catches up once they have answered. Warm claims wait here for
//! their batch (`WarmClaims`; `lifecycle::warm` runs the batches), and
//! learn that their instance settled (`InstanceNews`). The vocabulary a
//! signup is carried in from the API down (`SignUp`) lives here too,
//! below every layer that passes it on.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

use super::batch::Batcher;
use crate::model::{InstanceStatus, RouteVersion, Tier};

/// What a waiting signup needs of its instance once it settled: its
/// status, its own route's version (to wait for the edges) and its
/// container with the sealed gateway token (a retried claim moved it).
#[derive(Clone, Debug)]
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

/// A customer's signup, carried whole from the API handler to the claim
/// and its warm batch: who, which subdomain (generated when none was
/// asked for), which provider keys, under which `Idempotency-Key`.
/// `lifecycle::signup` validates it in place before anything is claimed.
#[derive(Clone, Debug)]
pub struct SignUp {
    pub user_id: Uuid,
    pub subdomain: String,
    /// Provider → key, as given (validated: normalized).
    pub api_keys: BTreeMap<String, String>,
    pub idempotency: Option<IdempotencyKey>,
}

/// A request's `Idempotency-Key` and the fingerprint of the body it came
/// with (a repeat must send the same body).
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: Vec<u8>,
}

/// A claim waiting for its batch: the signup, the id its instance gets and
/// its keys sealed under that instance's data key.
#[derive(Clone)]
pub struct WarmClaim {
    pub instance_id: Uuid,
    pub signup: SignUp,
    pub sealed: SealedKeys,
}

/// An instance's data key, wrapped under the KEK, and its provider keys
/// sealed under the data key: sealed before any transaction starts, so no
/// lock waits on the crypto.
#[derive(Clone)]
pub struct SealedKeys {
    pub kek_id: String,
    pub wrapped_dek: Vec<u8>,
    /// Provider key names and their sealed values.
    pub keys: Vec<(String, Vec<u8>)>,
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

pub struct ClaimsInFlight {
    count: watch::Sender<usize>,
}

impl Default for ClaimsInFlight {
    fn default() -> Self {
        Self {
            count: watch::Sender::new(0),
        }
    }
}

/// One signup in flight; dropping it (however the signup ends) lets it go.
pub struct InFlight<'a>(&'a ClaimsInFlight);

impl ClaimsInFlight {
    /// Counts a signup in until the guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        self.count.send_modify(|n| *n += 1);
        InFlight(self)
    }

    pub fn busy(&self) -> bool {
        *self.count.borrow() > 0
    }

    /// Resolves once no signup is in flight.
    pub async fn quiet(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.count.send_modify(|n| *n = n.saturating_sub(1));
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
}
