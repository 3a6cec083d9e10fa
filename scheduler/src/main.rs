//! `clawdeploy-scheduler`: parses configuration, sets up tracing, and runs
//! the scheduler library (or one of its operator commands).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use clawdeploy_scheduler::archives::ArchiveConfig;
use clawdeploy_scheduler::crypto::pki::{Ca, Identity};
use clawdeploy_scheduler::{serve, Config, ServeOptions};

#[derive(Parser)]
#[command(name = "clawdeploy-scheduler", version, about = "ClawDeploy scheduler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler: customer API, gRPC for agents and edges, pool manager.
    Serve(Box<ServeArgs>),
    /// Certificate authority operations.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Key-encryption key operations.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wraps every tenant data key (and re-seals gateway tokens and
    /// stored answers) under a new key-encryption key, in one transaction,
    /// then writes the new key to <data-dir>/secret.key (the old one is kept
    /// as secret.key.old). Restart the schedulers with the new key after.
    Rotate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, env = "CLAWDEPLOY_DATA_DIR", default_value = ".local/scheduler")]
        data_dir: PathBuf,
        /// The current key (64 hex chars); default: <data-dir>/secret.key.
        #[arg(long, env = "CLAWDEPLOY_SECRET_KEY", hide_env_values = true)]
        secret_key: Option<String>,
        /// The new key (64 hex chars); default: a fresh random one.
        #[arg(long, env = "CLAWDEPLOY_NEW_SECRET_KEY", hide_env_values = true)]
        new_secret_key: Option<String>,
    },
}

#[derive(Parser)]
struct ServeArgs {
    #[arg(long, env = "CLAWDEPLOY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    #[arg(long, env = "CLAWDEPLOY_GRPC_LISTEN", default_value = "127.0.0.1:7443")]
    grpc_listen: SocketAddr,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "CLAWDEPLOY_DB_MAX_CONNECTIONS", default_value_t = 32)]
    db_max_connections: u32,
    /// Connections the pool keeps open even when idle (up to the maximum).
    /// A connection opened under load costs PostgreSQL a new backend's
    /// start-up and cold caches right when it is busiest: a scheduler that
    /// takes bursts of signups keeps them all (`= --db-max-connections`).
    #[arg(long, env = "CLAWDEPLOY_DB_MIN_CONNECTIONS", default_value_t = 0)]
    db_min_connections: u32,
    /// Connections of the agents' own pool, apart from the one above: the
    /// agents' reports and desired-state pushes run there, so requests
    /// queueing for connections (a burst of signups) never hold up the
    /// work that completes them (0: they share the pool above). Kept open
    /// when `--db-min-connections` is above 0.
    #[arg(long, env = "CLAWDEPLOY_DB_AGENT_CONNECTIONS", default_value_t = 4)]
    db_agent_connections: u32,
    /// How long a request waits for a pool connection before answering
    /// `503 database_unavailable` (the database away, or the pool busy).
    #[arg(long, env = "CLAWDEPLOY_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = 5)]
    db_acquire_timeout_secs: u64,
    /// PostgreSQL's `statement_timeout` for the scheduler's connections
    /// (0: none): no request hangs on a stuck statement.
    #[arg(
        long,
        env = "CLAWDEPLOY_DB_STATEMENT_TIMEOUT_SECS",
        default_value_t = 30
    )]
    db_statement_timeout_secs: u64,
    /// CA and key material.
    #[arg(long, env = "CLAWDEPLOY_DATA_DIR", default_value = ".local/scheduler")]
    data_dir: PathBuf,
    /// AES-256 key (64 hex chars) for secrets at rest; default: <data-dir>/secret.key.
    #[arg(long, env = "CLAWDEPLOY_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Names (DNS or IP) on the gRPC server certificate.
    #[arg(
        long,
        env = "CLAWDEPLOY_GRPC_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    grpc_server_names: Vec<String>,
    #[arg(
        long,
        env = "CLAWDEPLOY_BASE_DOMAIN",
        default_value = "clawdeploy.localhost"
    )]
    base_domain: String,
    /// Scheme of customer URLs (https in production, http for a local edge).
    #[arg(long, env = "CLAWDEPLOY_PUBLIC_SCHEME", default_value = "https")]
    public_scheme: String,
    /// Port in customer URLs, when the edge is not on the scheme's default port.
    #[arg(long, env = "CLAWDEPLOY_PUBLIC_PORT")]
    public_port: Option<u16>,
    /// OpenClaw image for pool containers.
    #[arg(
        long,
        env = "CLAWDEPLOY_IMAGE",
        default_value = "clawdeploy/openclaw-standin:dev"
    )]
    image: String,
    #[arg(long, env = "CLAWDEPLOY_POOL_GENERATION", default_value_t = 1)]
    pool_generation: i32,
    #[arg(long, env = "CLAWDEPLOY_MIN_IDLE", default_value_t = 5)]
    min_idle: u32,
    #[arg(long, env = "CLAWDEPLOY_MAX_IDLE", default_value_t = 20)]
    max_idle: u32,
    /// Seconds without a heartbeat before a node is unreachable.
    #[arg(long, env = "CLAWDEPLOY_HEARTBEAT_TTL_SECS", default_value_t = 10)]
    heartbeat_ttl_secs: u64,
    /// Seconds a signup waits for the instance before answering 202 with a
    /// status URL.
    #[arg(long, env = "CLAWDEPLOY_CLAIM_WAIT_SECS", default_value_t = 10)]
    claim_wait_secs: u64,
    /// Seconds before an unconfirmed claim moves to a fresh container.
    #[arg(long, env = "CLAWDEPLOY_CLAIM_TIMEOUT_SECS", default_value_t = 20)]
    claim_timeout_secs: u64,
    /// Warm-claim batches that may run at once. Signups that arrive while
    /// these run wait and go together in the next: one transaction claims
    /// for all of them. Two keep one batch forming while the other is in
    /// the database.
    #[arg(long, env = "CLAWDEPLOY_CLAIM_BATCHES", default_value_t = 2)]
    claim_batches: usize,
    /// The most claims one warm-claim batch takes (1: every claim in a
    /// transaction of its own).
    #[arg(long, env = "CLAWDEPLOY_CLAIM_BATCH_MAX", default_value_t = 32)]
    claim_batch_max: usize,
    /// Seconds a released instance's data is kept (stopped) before its
    /// container and volume are destroyed.
    #[arg(long, env = "CLAWDEPLOY_RELEASE_GRACE_SECS", default_value_t = 7 * 24 * 3600)]
    release_grace_secs: u64,
    /// Seconds after a release before its subdomain may go to anyone else.
    #[arg(long, env = "CLAWDEPLOY_SUBDOMAIN_COOLDOWN_SECS", default_value_t = 30 * 24 * 3600)]
    subdomain_cooldown_secs: u64,
    /// Bearer token for the operator API under /admin (off when unset).
    #[arg(long, env = "CLAWDEPLOY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// S3-compatible endpoint for state archives (migrations, backups).
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_ENDPOINT", requires = "archive_bucket")]
    archive_endpoint: Option<String>,
    /// The archives' bucket; without it archives are off.
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_BUCKET", requires = "archive_endpoint")]
    archive_bucket: Option<String>,
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_REGION", default_value = "us-east-1")]
    archive_region: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_ARCHIVE_ACCESS_KEY_ID",
        hide_env_values = true,
        default_value = ""
    )]
    archive_access_key_id: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_ARCHIVE_SECRET_ACCESS_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    archive_secret_access_key: String,
    /// Seconds a presigned archive URL handed to an agent stays valid.
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_URL_TTL_SECS", default_value_t = 900)]
    archive_url_ttl_secs: u64,
    /// Lifetime of node certificates in seconds (nodes renew at about 2/3).
    #[arg(long, env = "CLAWDEPLOY_NODE_CERT_TTL_SECS", default_value_t = 24 * 3600)]
    node_cert_ttl_secs: u64,
    /// Default lifetime of join tokens in seconds.
    #[arg(long, env = "CLAWDEPLOY_JOIN_TOKEN_TTL_SECS", default_value_t = 24 * 3600)]
    join_token_ttl_secs: u64,
    /// Seconds a migration step (export; import and start) may take before
    /// the migration rolls back and the source runs again.
    #[arg(
        long,
        env = "CLAWDEPLOY_MIGRATION_STEP_TIMEOUT_SECS",
        default_value_t = 120
    )]
    migration_step_timeout_secs: u64,
    /// Tenants migrating off one evacuating node at a time.
    #[arg(long, env = "CLAWDEPLOY_EVACUATE_CONCURRENCY", default_value_t = 2)]
    evacuate_concurrency: u32,
    /// Seconds between two backups of a ready instance (daily by default).
    #[arg(long, env = "CLAWDEPLOY_BACKUP_INTERVAL_SECS", default_value_t = 24 * 3600)]
    backup_interval_secs: u64,
    /// Seconds a backup is kept before it is deleted from the store (30 days).
    #[arg(long, env = "CLAWDEPLOY_BACKUP_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    backup_retention_secs: u64,
    /// Signups that may wait for capacity when every node is full (answered
    /// 202 `queued`); beyond it they get 503 `no_capacity`.
    #[arg(long, env = "CLAWDEPLOY_SIGNUP_QUEUE_MAX", default_value_t = 1000)]
    signup_queue_max: u32,
    /// Registrations one client address may attempt per hour (refused ones
    /// for a taken email count too); beyond, 429 with Retry-After.
    #[arg(
        long,
        env = "CLAWDEPLOY_REGISTRATIONS_PER_ADDRESS_PER_HOUR",
        default_value_t = 20
    )]
    registrations_per_address_per_hour: u32,
    /// Free bytes a node's state disk needs to get new containers and
    /// claims (as its agent reports at each heartbeat); below, its tenants
    /// stay and nothing new lands there.
    #[arg(long, env = "CLAWDEPLOY_NODE_MIN_DISK_BYTES", default_value_t = 1 << 30)]
    node_min_disk_bytes: u64,
    /// The Stripe price id of the pro tier (shown by GET /api/billing/plans).
    #[arg(long, env = "CLAWDEPLOY_STRIPE_PRICE_PRO")]
    stripe_price_pro: Option<String>,
    /// The Stripe price id of the team tier.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_PRICE_TEAM")]
    stripe_price_team: Option<String>,
    /// The secret Stripe signs webhooks with (`whsec_…`); billing's webhook
    /// answers 503 billing_disabled without it.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    stripe_webhook_secret: Option<String>,
    /// Seconds a paid tier lasts after Stripe stops retrying a payment.
    #[arg(long, env = "CLAWDEPLOY_BILLING_GRACE_SECS", default_value_t = 7 * 24 * 3600)]
    billing_grace_secs: u64,
    /// Stripe's secret key (`sk_…`); billing's checkout and portal answer
    /// 503 billing_disabled without it.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Stripe's API base (the local stand-in's address in development).
    #[arg(
        long,
        env = "CLAWDEPLOY_STRIPE_API_BASE",
        default_value = "https://api.stripe.com/"
    )]
    stripe_api_base: String,
    /// Where the page and API are served: billing's redirect URLs must lead
    /// back here.
    #[arg(
        long,
        env = "CLAWDEPLOY_PUBLIC_ORIGIN",
        default_value = "https://clawdeploy.localhost"
    )]
    public_origin: String,
    /// Custom domains one instance may have.
    #[arg(long, env = "CLAWDEPLOY_MAX_DOMAINS_PER_INSTANCE", default_value_t = 5)]
    max_domains_per_instance: u32,
    /// The edges' public addresses (comma-separated): what an apex custom
    /// domain's A/AAAA records point at.
    #[arg(long, env = "CLAWDEPLOY_EDGE_ADDRESSES", value_delimiter = ',')]
    edge_addresses: Vec<std::net::IpAddr>,
    /// Nameservers the domain ownership checks ask (comma-separated
    /// `ip:port`; none: checks are off).
    #[arg(long, env = "CLAWDEPLOY_DNS_NAMESERVERS", value_delimiter = ',')]
    dns_nameservers: Vec<std::net::SocketAddr>,
    /// The ACME directory certificates for custom domains come from (e.g.
    /// Let's Encrypt's); none: domains are verified but get no certificate.
    #[arg(long, env = "CLAWDEPLOY_ACME_DIRECTORY_URL")]
    acme_directory_url: Option<String>,
    /// A PEM root the ACME directory's own TLS certificate chains to (a
    /// test CA such as pebble); the system's roots when unset.
    #[arg(long, env = "CLAWDEPLOY_ACME_CA_BUNDLE")]
    acme_ca_bundle: Option<PathBuf>,
    /// Contact for the ACME account (`mailto:ops@example.com`).
    #[arg(long, env = "CLAWDEPLOY_ACME_CONTACT")]
    acme_contact: Option<String>,
    /// ACME orders per hour, for the whole account.
    #[arg(long, env = "CLAWDEPLOY_ACME_ORDERS_PER_HOUR", default_value_t = 100)]
    acme_orders_per_hour: u32,
    /// ACME orders per hour for one hostname.
    #[arg(
        long,
        env = "CLAWDEPLOY_ACME_ORDERS_PER_HOSTNAME_PER_HOUR",
        default_value_t = 5
    )]
    acme_orders_per_hostname_per_hour: u32,
    /// Seconds before the first retry of a failed order (doubling per
    /// failure, at most six hours).
    #[arg(long, env = "CLAWDEPLOY_ACME_RETRY_BASE_SECS", default_value_t = 60)]
    acme_retry_base_secs: u64,
    /// Seconds between ownership re-checks of a proven domain.
    #[arg(long, env = "CLAWDEPLOY_DOMAIN_RECHECK_SECS", default_value_t = 24 * 3600)]
    domain_recheck_secs: u64,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the CA in the data directory (no-op when it exists).
    Init {
        #[arg(long, env = "CLAWDEPLOY_DATA_DIR", default_value = ".local/scheduler")]
        data_dir: PathBuf,
    },
    /// Issue a certificate for a node agent or an edge into --out.
    Issue {
        #[arg(long, env = "CLAWDEPLOY_DATA_DIR", default_value = ".local/scheduler")]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 24 * 30)]
        hours: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Node,
    Edge,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clawdeploy_common::telemetry::init_tracing("info,sqlx=warn");
    match Cli::parse().command {
        Command::Serve(a) => {
            let a = *a;
            let http = tokio::net::TcpListener::bind(a.http_listen)
                .await
                .with_context(|| format!("binding {}", a.http_listen))?;
            let grpc = tokio::net::TcpListener::bind(a.grpc_listen)
                .await
                .with_context(|| format!("binding {}", a.grpc_listen))?;
            tracing::info!(http = %http.local_addr()?, grpc = %grpc.local_addr()?, "listening");
            let opts = ServeOptions {
                cfg: Config {
                    base_domain: a.base_domain.trim_end_matches('.').to_ascii_lowercase(),
                    public_scheme: a.public_scheme,
                    public_port: a.public_port,
                    image: a.image,
                    pool_generation: a.pool_generation,
                    min_idle: a.min_idle,
                    max_idle: a.max_idle,
                    heartbeat_ttl: Duration::from_secs(a.heartbeat_ttl_secs),
                    claim_wait: Duration::from_secs(a.claim_wait_secs),
                    claim_timeout: Duration::from_secs(a.claim_timeout_secs.max(1)),
                    claim_batches: a.claim_batches,
                    claim_batch_max: a.claim_batch_max,
                    release_grace: Duration::from_secs(a.release_grace_secs),
                    subdomain_cooldown: Duration::from_secs(a.subdomain_cooldown_secs),
                    node_cert_lifetime: Duration::from_secs(a.node_cert_ttl_secs.max(3)),
                    join_token_ttl: Duration::from_secs(a.join_token_ttl_secs.max(1)),
                    migration_step_timeout: Duration::from_secs(
                        a.migration_step_timeout_secs.max(1),
                    ),
                    evacuate_concurrency: a.evacuate_concurrency.max(1),
                    backup_interval: Duration::from_secs(a.backup_interval_secs.max(1)),
                    backup_retention: Duration::from_secs(a.backup_retention_secs.max(1)),
                    signup_queue_max: a.signup_queue_max,
                    registrations_per_address_per_hour: a.registrations_per_address_per_hour,
                    node_min_disk_bytes: a.node_min_disk_bytes,
                    stripe_price_pro: a.stripe_price_pro.clone(),
                    stripe_price_team: a.stripe_price_team.clone(),
                    stripe_webhook_secret: a.stripe_webhook_secret.clone(),
                    billing_grace: Duration::from_secs(a.billing_grace_secs),
                    public_origin: a.public_origin.clone(),
                    max_domains_per_instance: a.max_domains_per_instance,
                    edge_addresses: a.edge_addresses.clone(),
                    dns_nameservers: a.dns_nameservers.clone(),
                    acme: a.acme_directory_url.clone().map(|directory_url| {
                        clawdeploy_scheduler::acme::AcmeConfig {
                            directory_url,
                            ca_bundle: a.acme_ca_bundle.clone(),
                            contact: a.acme_contact.clone(),
                        }
                    }),
                    acme_orders_per_hour: a.acme_orders_per_hour,
                    acme_orders_per_hostname_per_hour: a.acme_orders_per_hostname_per_hour,
                    acme_retry_base: Duration::from_secs(a.acme_retry_base_secs),
                    domain_recheck: Duration::from_secs(a.domain_recheck_secs),
                    ..Config::default()
                },
                database_url: a.database_url,
                data_dir: a.data_dir,
                secret_key: a.secret_key,
                grpc_server_names: a.grpc_server_names,
                db: clawdeploy_scheduler::DbOptions {
                    max_connections: a.db_max_connections,
                    min_connections: a.db_min_connections,
                    agent_connections: a.db_agent_connections,
                    acquire_timeout: Duration::from_secs(a.db_acquire_timeout_secs),
                    statement_timeout: Duration::from_secs(a.db_statement_timeout_secs),
                },
                admin_token: a.admin_token,
                archives: a.archive_bucket.map(|bucket| ArchiveConfig {
                    endpoint: a.archive_endpoint.unwrap_or_default(),
                    bucket,
                    region: a.archive_region,
                    access_key_id: a.archive_access_key_id,
                    secret_access_key: a.archive_secret_access_key,
                    url_ttl: Duration::from_secs(a.archive_url_ttl_secs.max(1)),
                }),
                stripe: a.stripe_secret_key.map(|key| (key, a.stripe_api_base)),
            };
            serve(opts, http, grpc, clawdeploy_common::shutdown::signal()).await
        }
        Command::Keys(KeysCommand::Rotate {
            database_url,
            data_dir,
            secret_key,
            new_secret_key,
        }) => {
            anyhow::ensure!(
                secret_key.is_some() || data_dir.join("secret.key").exists(),
                "no current key: give --secret-key or a --data-dir holding secret.key"
            );
            let old = clawdeploy_scheduler::key_from(secret_key.as_deref(), &data_dir)?;
            let new_hex = new_secret_key
                .unwrap_or_else(clawdeploy_scheduler::crypto::SecretBox::generate_key_hex);
            let new = clawdeploy_scheduler::crypto::SecretBox::from_hex(&new_hex)?;
            anyhow::ensure!(old.id() != new.id(), "the new key is the current key");
            let db = sqlx::PgPool::connect(&database_url)
                .await
                .context("connecting to PostgreSQL")?;
            let done = clawdeploy_scheduler::crypto::envelope::rotate(&db, &old, &new).await?;
            let path = data_dir.join("secret.key");
            if path.exists() {
                std::fs::copy(&path, data_dir.join("secret.key.old"))?;
            }
            let tmp = data_dir.join("secret.key.tmp");
            std::fs::write(&tmp, &new_hex)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            println!(
                "KEK {} → {}: {} data keys re-wrapped, {} gateway tokens, {} stored answers and {} certificate keys re-sealed; new key in {}",
                old.id(),
                new.id(),
                done.data_keys,
                done.gateway_tokens,
                done.idempotent_answers,
                done.certificate_keys,
                path.display()
            );
            Ok(())
        }
        Command::Pki(PkiCommand::Init { data_dir }) => {
            Ca::load_or_create(&data_dir)?;
            println!("{}", data_dir.join("ca.crt.pem").display());
            Ok(())
        }
        Command::Pki(PkiCommand::Issue {
            data_dir,
            kind,
            id,
            out,
            hours,
        }) => {
            anyhow::ensure!(
                clawdeploy_scheduler::crypto::pki::valid_id(&id),
                "id must be 1-63 letters, digits, '-' or '_'"
            );
            let ca = Ca::load_or_create(&data_dir)?;
            let identity = match kind {
                Kind::Node => Identity::Node(id.clone()),
                Kind::Edge => Identity::Edge(id.clone()),
            };
            let issued = ca.issue(&identity, &[], Duration::from_secs(hours * 3600))?;
            ca.write_bundle(&out, &id, &issued)?;
            println!("{}", out.join(format!("{id}.crt.pem")).display());
            Ok(())
        }
    }
}
