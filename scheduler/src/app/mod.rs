//! Shared scheduler state: configuration, the database pool, the secret box
//! and the in-process channels that activate background tasks, open agent
//! sessions, edge watchers and waiting signup requests. Everything else
//! depends on this module; it depends only on `crypto` and its own
//! registries.

pub mod batch;
pub mod claims;
pub mod config;
pub mod route_feed;
pub mod sessions;
pub mod tasks;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::crypto::pki::Ca;
use crate::crypto::SecretBox;
pub use config::Config;
use route_feed::RouteFeed;
use sessions::Sessions;

pub struct App {
    pub cfg: Config,
    pub db: PgPool,
    /// The agents' own connections: their reports and the desired-state
    /// pushes run here, so requests queueing for `db` during a burst (the
    /// signups themselves, and their answers) never hold up the work that
    /// completes them. The same pool as `db` unless configured apart.
    pub agents_db: PgPool,
    pub secrets: SecretBox,
    pub sessions: Sessions,
    /// Route changes for edge watchers, sent after their transaction
    /// commits, and which of them each edge has applied.
    pub route_feed: RouteFeed,
    /// Activates background tasks between their periodic runs.
    pub tasks: tasks::Activators,
    /// Signups claiming here now: the pool manager's refills wait for them.
    pub claims: claims::ClaimsInFlight,
    /// Claims that may use database connections at once (`claim_slots`),
    /// besides the warm batches.
    pub claim_slots: tokio::sync::Semaphore,
    /// Warm claims waiting for, or in, a batch.
    pub warm_claims: claims::WarmClaims,
    /// Instances that just became ready or failed (wakes waiting signup
    /// requests).
    pub instance_ready: broadcast::Sender<claims::InstanceNews>,
    /// Signs node certificates (join and renewal).
    pub ca: Ca,
    /// SHA-256 of the operator's admin token; `None` switches `/admin` off.
    pub admin_token_hash: Option<[u8; 32]>,
    /// Names this process in events to the other schedulers.
    pub origin: String,
    /// Highest route version broadcast to this scheduler's edges.
    pub route_watermark: std::sync::atomic::AtomicU64,
    /// The object store for state archives; `None` when not configured.
    pub archives: Option<crate::archives::Archives>,
    /// Stripe; `None` when no secret key is configured (billing is off).
    pub stripe: Option<crate::payments::StripeProvider>,
    /// DNS lookups for domain ownership checks.
    pub dns: crate::dns::DnsChecker,
    /// The ACME client, when a CA is configured.
    pub acme: Option<crate::acme::Acme>,
}

pub type AppRef = Arc<App>;

/// The scheduler's database pools: `requests` for everything but the
/// agents' work, `agents` for that (`App::agents_db`).
pub struct Pools {
    pub requests: PgPool,
    pub agents: PgPool,
}

impl From<PgPool> for Pools {
    /// One pool for both.
    fn from(db: PgPool) -> Self {
        Self {
            agents: db.clone(),
            requests: db,
        }
    }
}

/// How many of a pool's `max_connections` claims may hold at once: all but
/// a quarter (at least two). A burst of signups queues here, not in the
/// pool, so the work that finishes the claims already made (pushes to the
/// agents, their reports, the answers) always finds a connection; with
/// every connection queued for by claims, the first claim of a burst was
/// confirmed only after the last one had committed.
fn claim_slots(max_connections: u32) -> usize {
    let reserved = (max_connections / 4).max(2);
    max_connections.saturating_sub(reserved).max(1) as usize
}

impl App {
    pub fn new(
        cfg: Config,
        db: impl Into<Pools>,
        secrets: SecretBox,
        ca: Ca,
        admin_token: Option<&str>,
        archives: Option<crate::archives::Archives>,
    ) -> AppRef {
        Self::with_stripe(cfg, db, secrets, ca, admin_token, archives, None)
    }

    /// `new`, with Stripe configured (billing on).
    #[allow(clippy::too_many_arguments)]
    pub fn with_stripe(
        cfg: Config,
        db: impl Into<Pools>,
        secrets: SecretBox,
        ca: Ca,
        admin_token: Option<&str>,
        archives: Option<crate::archives::Archives>,
        stripe: Option<crate::payments::StripeProvider>,
    ) -> AppRef {
        use sha2::Digest;
        let Pools {
            requests: db,
            agents: agents_db,
        } = db.into();
        let cfg_dns = cfg.dns_nameservers.clone();
        let claim_slots =
            tokio::sync::Semaphore::new(claim_slots(db.options().get_max_connections()));
        let warm_claims = claims::WarmClaims::new(cfg.claim_batches, cfg.claim_batch_max);
        let cfg_acme = cfg.acme.clone();
        Arc::new(App {
            cfg,
            db,
            agents_db,
            secrets,
            sessions: Sessions::default(),
            route_feed: RouteFeed::default(),
            tasks: Default::default(),
            claims: Default::default(),
            claim_slots,
            warm_claims,
            instance_ready: broadcast::channel(4096).0,
            ca,
            admin_token_hash: admin_token
                .filter(|t| !t.is_empty())
                .map(|t| sha2::Sha256::digest(t.as_bytes()).into()),
            origin: Uuid::new_v4().simple().to_string(),
            route_watermark: Default::default(),
            archives,
            stripe,
            dns: crate::dns::DnsChecker::new(&cfg_dns),
            acme: cfg_acme.map(crate::acme::Acme::new),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn claims_leave_connections_for_the_work_that_completes_them() {
        assert_eq!(super::claim_slots(12), 9);
        assert_eq!(super::claim_slots(32), 24);
        assert_eq!(super::claim_slots(4), 2);
        assert_eq!(super::claim_slots(2), 1);
        assert_eq!(super::claim_slots(1), 1);
    }
}
