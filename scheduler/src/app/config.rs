//! The scheduler's configuration, parsed by clap straight from its flags
//! (each with its environment variable): `clawdeploy-scheduler serve`
//! flattens it. Durations are given in seconds (`--…-secs`); bounds that
//! must hold are applied by the value parsers at the end of this file.
//! `Config::default()` is what the flags default to.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use clawdeploy_common::flags::{nonzero_secs, secs};

use crate::acme::AcmeConfig;
use crate::model::Tier;

#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Customer hosts are `<subdomain>.<base domain>` (lower-cased, without
    /// a trailing dot).
    #[arg(long, env = "CLAWDEPLOY_BASE_DOMAIN", default_value = "clawdeploy.localhost", value_parser = domain)]
    pub base_domain: String,
    /// Scheme of customer URLs (https in production, http for a local edge).
    #[arg(long, env = "CLAWDEPLOY_PUBLIC_SCHEME", default_value = "https")]
    pub public_scheme: String,
    /// Port in customer URLs, when the edge is not on the scheme's default port.
    #[arg(long, env = "CLAWDEPLOY_PUBLIC_PORT")]
    pub public_port: Option<u16>,
    /// OpenClaw image for pool containers.
    #[arg(
        long,
        env = "CLAWDEPLOY_IMAGE",
        default_value = "clawdeploy/openclaw-standin:dev"
    )]
    pub image: String,
    #[arg(long, env = "CLAWDEPLOY_POOL_GENERATION", default_value_t = 1)]
    pub pool_generation: i32,
    #[arg(long, env = "CLAWDEPLOY_MIN_IDLE", default_value_t = 5)]
    pub min_idle: u32,
    #[arg(long, env = "CLAWDEPLOY_MAX_IDLE", default_value_t = 20)]
    pub max_idle: u32,
    /// Seconds without a heartbeat before a node is unreachable.
    #[arg(long = "heartbeat-ttl-secs", env = "CLAWDEPLOY_HEARTBEAT_TTL_SECS", default_value = "10", value_parser = secs)]
    pub heartbeat_ttl: Duration,
    /// Seconds a signup waits for the agent to confirm the instance live
    /// before answering 202 with a status URL (it still becomes ready).
    #[arg(long = "claim-wait-secs", env = "CLAWDEPLOY_CLAIM_WAIT_SECS", default_value = "10", value_parser = secs)]
    pub claim_wait: Duration,
    /// Seconds before an unconfirmed claim moves to a fresh container
    /// (once; a second miss fails the instance). At least 1.
    #[arg(long = "claim-timeout-secs", env = "CLAWDEPLOY_CLAIM_TIMEOUT_SECS", default_value = "20", value_parser = nonzero_secs)]
    pub claim_timeout: Duration,
    /// Warm-claim batches that may run at once. Signups that arrive while
    /// these run wait and go together in the next: one transaction claims
    /// for all of them. Two keep one batch forming while the other is in
    /// the database.
    #[arg(long, env = "CLAWDEPLOY_CLAIM_BATCHES", default_value_t = 2)]
    pub claim_batches: usize,
    /// The most claims one warm-claim batch takes (1: every claim in a
    /// transaction of its own).
    #[arg(long, env = "CLAWDEPLOY_CLAIM_BATCH_MAX", default_value_t = 32)]
    pub claim_batch_max: usize,
    /// Seconds a pool container may take to become healthy (creating and
    /// warming) before it is replaced.
    #[arg(long = "warm-timeout-secs", env = "CLAWDEPLOY_WARM_TIMEOUT_SECS", default_value = "120", value_parser = secs)]
    pub warm_timeout: Duration,
    /// Seconds a released instance's data is kept (stopped) before its
    /// container and volume are destroyed.
    #[arg(long = "release-grace-secs", env = "CLAWDEPLOY_RELEASE_GRACE_SECS", default_value = "604800", value_parser = secs)]
    pub release_grace: Duration,
    /// Seconds after a release before its subdomain may go to anyone else.
    #[arg(long = "subdomain-cooldown-secs", env = "CLAWDEPLOY_SUBDOMAIN_COOLDOWN_SECS", default_value = "2592000", value_parser = secs)]
    pub subdomain_cooldown: Duration,
    /// Lifetime of node certificates in seconds (nodes renew at about 2/3;
    /// at least 3).
    #[arg(long = "node-cert-ttl-secs", env = "CLAWDEPLOY_NODE_CERT_TTL_SECS", default_value = "86400", value_parser = secs_at_least_3)]
    pub node_cert_lifetime: Duration,
    /// Default lifetime of join tokens in seconds.
    #[arg(long = "join-token-ttl-secs", env = "CLAWDEPLOY_JOIN_TOKEN_TTL_SECS", default_value = "86400", value_parser = nonzero_secs)]
    pub join_token_ttl: Duration,
    /// Seconds a migration step (export; import and start) may take before
    /// the migration rolls back and the source runs again.
    #[arg(long = "migration-step-timeout-secs", env = "CLAWDEPLOY_MIGRATION_STEP_TIMEOUT_SECS", default_value = "120", value_parser = nonzero_secs)]
    pub migration_step_timeout: Duration,
    /// Tenants migrating off one evacuating node at a time (at least 1).
    #[arg(long, env = "CLAWDEPLOY_EVACUATE_CONCURRENCY", default_value = "2", value_parser = at_least_1)]
    pub evacuate_concurrency: u32,
    /// Seconds between two backups of a ready instance (daily by default).
    #[arg(long = "backup-interval-secs", env = "CLAWDEPLOY_BACKUP_INTERVAL_SECS", default_value = "86400", value_parser = nonzero_secs)]
    pub backup_interval: Duration,
    /// Seconds a backup is kept before it is deleted from the store (30 days).
    #[arg(long = "backup-retention-secs", env = "CLAWDEPLOY_BACKUP_RETENTION_SECS", default_value = "2592000", value_parser = nonzero_secs)]
    pub backup_retention: Duration,
    /// Hours an account may leave its email address unproven; then its
    /// instance is suspended (stopped with its state; the edges say why)
    /// until the address is proven. Decimals allowed (`0.5`).
    #[arg(long = "verify-grace-hours", env = "CLAWDEPLOY_VERIFY_GRACE_HOURS", default_value = "48", value_parser = hours)]
    pub verify_grace: Duration,
    /// Signups that may wait for capacity when every node is full (answered
    /// 202 `queued`); beyond it they get 503 `no_capacity`.
    #[arg(long, env = "CLAWDEPLOY_SIGNUP_QUEUE_MAX", default_value_t = 1000)]
    pub signup_queue_max: u32,
    /// Registrations one client address may attempt per hour (refused ones
    /// for a taken email count too); beyond, 429 with Retry-After.
    #[arg(
        long,
        env = "CLAWDEPLOY_REGISTRATIONS_PER_ADDRESS_PER_HOUR",
        default_value_t = 20
    )]
    pub registrations_per_address_per_hour: u32,
    /// Free bytes a node's state disk needs to get new containers and
    /// claims (as its agent reports at each heartbeat); below, its tenants
    /// stay and nothing new lands there.
    #[arg(long, env = "CLAWDEPLOY_NODE_MIN_DISK_BYTES", default_value_t = 1 << 30)]
    pub node_min_disk_bytes: u64,
    /// The Stripe price id of the pro tier (shown by GET /api/billing/plans).
    #[arg(long, env = "CLAWDEPLOY_STRIPE_PRICE_PRO")]
    pub stripe_price_pro: Option<String>,
    /// The Stripe price id of the team tier.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_PRICE_TEAM")]
    pub stripe_price_team: Option<String>,
    /// The secret Stripe signs webhooks with (`whsec_…`); billing's webhook
    /// answers 503 billing_disabled without it.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,
    /// Seconds a paid tier lasts after Stripe stops retrying a payment.
    #[arg(long = "billing-grace-secs", env = "CLAWDEPLOY_BILLING_GRACE_SECS", default_value = "604800", value_parser = secs)]
    pub billing_grace: Duration,
    /// Where the page and API are served (`https://app.example.com`):
    /// billing's redirect URLs must lead back here.
    #[arg(
        long,
        env = "CLAWDEPLOY_PUBLIC_ORIGIN",
        default_value = "https://clawdeploy.localhost"
    )]
    pub public_origin: String,
    /// The metering proxy's base URL as tenants' gateways reach it (e.g.
    /// `https://llm.clawdeploy.com`); each provider entry of a gateway's
    /// `openclaw.json` then points at `<url>/p/<provider>/v1` with the
    /// instance's proxy token, and no provider key enters a container.
    /// Unset: customers' keys are written into the config (not for
    /// production; the scheduler warns).
    #[arg(long, env = "CLAWDEPLOY_LLM_PROXY_URL")]
    pub llm_proxy_url: Option<String>,
    /// Providers the platform resells with AI credits (comma-separated):
    /// an instance with no key of its own for one still gets its entry.
    #[arg(long, env = "CLAWDEPLOY_RESOLD_PROVIDERS", value_delimiter = ',')]
    pub resold_providers: Vec<String>,
    /// Messages a month on the free tier (the metering proxy enforces it;
    /// the dashboard shows it).
    #[arg(
        long,
        env = "CLAWDEPLOY_FREE_MESSAGES_PER_MONTH",
        default_value_t = 100
    )]
    pub free_messages_per_month: u32,
    /// Custom domains one instance may have.
    #[arg(long, env = "CLAWDEPLOY_MAX_DOMAINS_PER_INSTANCE", default_value_t = 5)]
    pub max_domains_per_instance: u32,
    /// The edges' public addresses (comma-separated): what an apex custom
    /// domain's A/AAAA records point at.
    #[arg(long, env = "CLAWDEPLOY_EDGE_ADDRESSES", value_delimiter = ',')]
    pub edge_addresses: Vec<IpAddr>,
    /// Nameservers the domain ownership checks ask (comma-separated
    /// `ip:port`; none: checks are off).
    #[arg(long, env = "CLAWDEPLOY_DNS_NAMESERVERS", value_delimiter = ',')]
    pub dns_nameservers: Vec<SocketAddr>,
    /// The ACME CA certificates for custom domains come from (none: domains
    /// are verified but get no certificate).
    #[command(flatten)]
    pub acme: Option<AcmeConfig>,
    /// ACME orders per hour, for the whole account.
    #[arg(long, env = "CLAWDEPLOY_ACME_ORDERS_PER_HOUR", default_value_t = 100)]
    pub acme_orders_per_hour: u32,
    /// ACME orders per hour for one hostname.
    #[arg(
        long,
        env = "CLAWDEPLOY_ACME_ORDERS_PER_HOSTNAME_PER_HOUR",
        default_value_t = 5
    )]
    pub acme_orders_per_hostname_per_hour: u32,
    /// Seconds before the first retry of a failed order (doubling per
    /// failure, at most six hours).
    #[arg(long = "acme-retry-base-secs", env = "CLAWDEPLOY_ACME_RETRY_BASE_SECS", default_value = "60", value_parser = secs)]
    pub acme_retry_base: Duration,
    /// Seconds between ownership re-checks of a proven domain.
    #[arg(long = "domain-recheck-secs", env = "CLAWDEPLOY_DOMAIN_RECHECK_SECS", default_value = "86400", value_parser = secs)]
    pub domain_recheck: Duration,
}

/// `Config` alone as a command line (for its defaults and its tests).
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    cfg: Config,
}

impl Default for Config {
    /// The flags' defaults (and whatever `CLAWDEPLOY_*` variables the
    /// environment sets).
    fn default() -> Self {
        Flags::parse_from(["clawdeploy-scheduler"]).cfg
    }
}

impl Config {
    /// The paid tier a Stripe price id stands for.
    pub fn tier_of_price(&self, price: &str) -> Option<Tier> {
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

    /// `node_min_disk_bytes` as SQL binds it.
    pub fn min_disk(&self) -> i64 {
        i64::try_from(self.node_min_disk_bytes).unwrap_or(i64::MAX)
    }
}

/// Whole seconds, at least 3: a certificate renews at about two thirds of
/// its life, which must leave it a second or more.
fn secs_at_least_3(s: &str) -> Result<Duration, String> {
    Ok(secs(s)?.max(Duration::from_secs(3)))
}

/// Hours, decimals allowed, as a duration.
fn hours(s: &str) -> Result<Duration, String> {
    let h: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number of hours: {e}"))?;
    if !(0.0..=1e6).contains(&h) {
        return Err(format!("{s:?} hours is out of range"));
    }
    Ok(Duration::from_secs_f64(h * 3600.0))
}

/// A count, 0 read as 1.
fn at_least_1(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map(|n| n.max(1))
        .map_err(|e| format!("{s:?} is not a count: {e}"))
}

/// A domain name as hosts are compared: lower case, no trailing dot.
fn domain(s: &str) -> Result<String, String> {
    Ok(s.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `serve` parses, as a test can give it.
    fn parse(args: &[&str]) -> Config {
        Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .cfg
    }

    #[test]
    fn flags_become_the_config_with_their_bounds() {
        let cfg = parse(&[
            "--base-domain",
            "Claw.Example.",
            "--claim-timeout-secs",
            "0",
            "--node-cert-ttl-secs",
            "1",
            "--evacuate-concurrency",
            "0",
            "--heartbeat-ttl-secs",
            "7",
            "--edge-addresses",
            "192.0.2.1,2001:db8::1",
        ]);
        assert_eq!(cfg.base_domain, "claw.example");
        assert_eq!(cfg.claim_timeout, Duration::from_secs(1));
        assert_eq!(cfg.node_cert_lifetime, Duration::from_secs(3));
        assert_eq!(cfg.evacuate_concurrency, 1);
        assert_eq!(cfg.heartbeat_ttl, Duration::from_secs(7));
        assert_eq!(cfg.edge_addresses.len(), 2);
        assert!(cfg.acme.is_none(), "no ACME flag: no ACME");
    }

    #[test]
    fn acme_is_on_with_its_directory_and_refused_without_one() {
        let cfg = parse(&[
            "--acme-directory-url",
            "https://127.0.0.1:14000/dir",
            "--acme-contact",
            "mailto:ops@example.com",
        ]);
        let acme = cfg.acme.expect("configured");
        assert_eq!(acme.directory_url, "https://127.0.0.1:14000/dir");
        assert_eq!(acme.contact.as_deref(), Some("mailto:ops@example.com"));
        assert!(acme.ca_bundle.is_none());
        assert!(
            Flags::try_parse_from(["x", "--acme-contact", "mailto:ops@example.com"]).is_err(),
            "a contact without a directory is a mistake, not silence"
        );
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let cfg = parse(&[]);
        assert_eq!(cfg.heartbeat_ttl, Duration::from_secs(10));
        assert_eq!(cfg.claim_timeout, Duration::from_secs(20));
        assert_eq!(cfg.warm_timeout, Duration::from_secs(120));
        assert_eq!(cfg.release_grace, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(cfg.subdomain_cooldown, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(cfg.node_min_disk_bytes, 1 << 30);
        assert_eq!((cfg.min_idle, cfg.max_idle), (5, 20));
        assert_eq!(cfg.verify_grace, Duration::from_secs(48 * 3600));
        assert_eq!(
            parse(&["--verify-grace-hours", "0.5"]).verify_grace,
            Duration::from_secs(1800)
        );
    }
}
