//! Shared scheduler state: configuration, the database pool, the secret box
//! and the in-process channels that activate background tasks, open agent
//! sessions, edge watchers and waiting signup requests. Everything else
//! depends on this module; it depends only on `crypto` and its own
//! registries.

pub mod batch;
pub mod claims;
pub mod route_feed;
pub mod sessions;
pub mod tasks;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::crypto::pki::Ca;
use crate::crypto::SecretBox;
use route_feed::RouteFeed;
use sessions::Sessions;

#[derive(Clone, Debug)]
pub struct Config {
    /// Customer hosts are `<subdomain>.<base_domain>`.
    pub base_domain: String,
    /// How customer URLs are printed: scheme and optional port of the edge.
    pub public_scheme: String,
    pub public_port: Option<u16>,
    /// The OpenClaw image pool containers run.
    pub image: String,
    pub pool_generation: i32,
    pub min_idle: u32,
    pub max_idle: u32,
    /// A node silent for this long is `unreachable`.
    pub heartbeat_ttl: Duration,
    /// How long a signup waits for the agent to confirm the config is live
    /// before answering 202 with a status URL (the instance still becomes
    /// ready).
    pub claim_wait: Duration,
    /// A claim the agent has not confirmed after this long is moved to a
    /// fresh container (once); a second miss fails the instance.
    pub claim_timeout: Duration,
    /// Warm-claim batches that may run at once, and the most claims one
    /// takes (`claims::WarmClaims`; 0 counts as 1).
    pub claim_batches: usize,
    pub claim_batch_max: usize,
    /// Containers stuck in creating/warming longer than this are replaced.
    pub warm_timeout: Duration,
    /// A released instance's data is kept this long, then destroyed.
    pub release_grace: Duration,
    /// A released subdomain goes to nobody else for this long.
    pub subdomain_cooldown: Duration,
    /// Lifetime of node certificates (nodes renew at about two thirds).
    pub node_cert_lifetime: Duration,
    /// Default lifetime of a join token.
    pub join_token_ttl: Duration,
    /// A migration step (export, import and start) that takes longer than
    /// this rolls the migration back.
    pub migration_step_timeout: Duration,
    /// Tenants migrating off one evacuating node at a time.
    pub evacuate_concurrency: u32,
    /// Each ready instance is backed up this often.
    pub backup_interval: Duration,
    /// Backups are deleted from the store after this long.
    pub backup_retention: Duration,
    /// Signups waiting for capacity at most; beyond, `503 no_capacity`.
    pub signup_queue_max: u32,
    /// Registrations one client address may attempt per hour.
    pub registrations_per_address_per_hour: u32,
    /// A node whose state disk has less free space gets no new containers
    /// and no claims (its tenants stay).
    pub node_min_disk_bytes: u64,
    /// Stripe price ids of the paid tiers, shown in the plan list.
    pub stripe_price_pro: Option<String>,
    pub stripe_price_team: Option<String>,
    /// Verifies Stripe's webhooks; billing's webhook is off without it.
    pub stripe_webhook_secret: Option<String>,
    /// After Stripe gives up on a payment, the paid tier lasts this long.
    pub billing_grace: Duration,
    /// Where the page and API are served (`https://app.example.com`):
    /// billing's redirect URLs must lead back here.
    pub public_origin: String,
    /// Custom domains one instance may have.
    pub max_domains_per_instance: u32,
    /// The edges' public addresses: the A/AAAA records of an apex domain.
    pub edge_addresses: Vec<std::net::IpAddr>,
    /// Where domain ownership checks ask (none: checks are off).
    pub dns_nameservers: Vec<std::net::SocketAddr>,
    /// The ACME CA certificates come from (none: no certificates).
    pub acme: Option<crate::acme::AcmeConfig>,
    /// Orders per hour for the whole account, and per hostname.
    pub acme_orders_per_hour: u32,
    pub acme_orders_per_hostname_per_hour: u32,
    /// The first wait after a failed order (doubling per failure).
    pub acme_retry_base: Duration,
    /// How often a proven domain's TXT record is looked up again.
    pub domain_recheck: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base_domain: "clawdeploy.localhost".into(),
            public_scheme: "https".into(),
            public_port: None,
            image: "clawdeploy/openclaw-standin:dev".into(),
            pool_generation: 1,
            min_idle: 5,
            max_idle: 20,
            heartbeat_ttl: Duration::from_secs(10),
            claim_wait: Duration::from_secs(10),
            claim_timeout: Duration::from_secs(20),
            claim_batches: 2,
            claim_batch_max: 32,
            warm_timeout: Duration::from_secs(120),
            release_grace: Duration::from_secs(7 * 24 * 3600),
            subdomain_cooldown: Duration::from_secs(30 * 24 * 3600),
            node_cert_lifetime: Duration::from_secs(24 * 3600),
            join_token_ttl: Duration::from_secs(24 * 3600),
            migration_step_timeout: Duration::from_secs(120),
            evacuate_concurrency: 2,
            backup_interval: Duration::from_secs(24 * 3600),
            backup_retention: Duration::from_secs(30 * 24 * 3600),
            signup_queue_max: 1000,
            registrations_per_address_per_hour: 20,
            node_min_disk_bytes: 1 << 30,
            stripe_price_pro: None,
            stripe_price_team: None,
            stripe_webhook_secret: None,
            billing_grace: Duration::from_secs(7 * 24 * 3600),
            public_origin: "https://clawdeploy.localhost".into(),
            max_domains_per_instance: 5,
            edge_addresses: Vec::new(),
            dns_nameservers: Vec::new(),
            acme: None,
            acme_orders_per_hour: 100,
            acme_orders_per_hostname_per_hour: 5,
            acme_retry_base: Duration::from_secs(60),
            domain_recheck: Duration::from_secs(24 * 3600),
        }
    }
}

impl Config {
    /// The paid tier a Stripe price id stands for.
    pub fn tier_of_price(&self, price: &str) -> Option<crate::model::Tier> {
        use crate::model::Tier;
        if self.stripe_price_pro.as_deref() == Some(price) {
            Some(Tier::Pro)
        } else if self.stripe_price_team.as_deref() == Some(price) {
            Some(Tier::Team)
        } else {
            None
        }
    }

    pub fn host_of(&self, subdomain: &str) -> String {
        format!("{subdomain}.{}", self.base_domain)
    }

    fn authority(&self, subdomain: &str) -> String {
        match self.public_port {
            Some(p) => format!("{}:{p}", self.host_of(subdomain)),
            None => self.host_of(subdomain),
        }
    }

    pub fn url_of(&self, subdomain: &str) -> String {
        format!("{}://{}", self.public_scheme, self.authority(subdomain))
    }

    pub fn gateway_url_of(&self, subdomain: &str) -> String {
        let ws = if self.public_scheme == "https" {
            "wss"
        } else {
            "ws"
        };
        format!("{ws}://{}", self.authority(subdomain))
    }
}

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

impl Config {
    /// `node_min_disk_bytes` as SQL binds it.
    pub fn min_disk(&self) -> i64 {
        i64::try_from(self.node_min_disk_bytes).unwrap_or(i64::MAX)
    }
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
