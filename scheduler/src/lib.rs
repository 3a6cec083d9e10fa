//! ClawDeploy scheduler: the source of truth (PostgreSQL), the customer API,
//! the mTLS gRPC server for agents and edges, the pool manager, assignment
//! and the platform's certificate authority.
//!
//! The modules, from the faces inwards (dependencies point down this list,
//! never up; `scripts/module-cycles` checks):
//! - `api` (HTTP) and `rpc` (gRPC): parse, call the domain, answer;
//! - `background`: the pool manager, housekeeping, the other schedulers'
//!   events;
//! - `lifecycle` (an instance's life), `accounts`, `agents` (desired state,
//!   sessions, enrollment), `fleet` (capacity, placement, demand, pool
//!   settings, nodes), `routes`;
//! - `events` (the transport between schedulers), `audit`, `app` (shared
//!   state), `crypto`, `model` (states and generations), `error`.
//!
//! This file only wires them together.

pub mod accounts;
pub mod acme;
pub mod agents;
pub mod api;
pub mod app;
pub mod archives;
pub mod audit;
pub mod background;
pub mod backup;
pub mod billing;
pub mod crypto;
pub mod db;
pub mod dns;
pub mod domains;
pub mod error;
pub mod events;
pub mod fleet;
pub mod lifecycle;
pub mod mail;
pub mod migration;
pub mod model;
pub mod outbox;
pub mod payments;
pub mod routes;
pub mod rpc;
pub mod telemetry;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};

pub use app::{App, AppRef, Config};
pub use db::DbOptions;

/// Everything `serve` needs besides its listeners: the flags of
/// `clawdeploy-scheduler serve`, parsed by clap.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeOptions {
    #[command(flatten)]
    pub cfg: Config,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Holds the CA (`ca.crt.pem`, `ca.key.pem`) and, when no key is given,
    /// the secret key file.
    #[arg(long, env = "CLAWDEPLOY_DATA_DIR", default_value = ".local/scheduler")]
    pub data_dir: PathBuf,
    /// AES-256 key (64 hex chars) for secrets at rest; default:
    /// <data-dir>/secret.key (created on first start).
    #[arg(long, env = "CLAWDEPLOY_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Names (DNS or IP) on the gRPC server certificate.
    #[arg(
        long,
        env = "CLAWDEPLOY_GRPC_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub grpc_server_names: Vec<String>,
    #[command(flatten)]
    pub db: DbOptions,
    /// Bearer token for the operator API under /admin (off when unset).
    #[arg(long, env = "CLAWDEPLOY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The S3-compatible store for state archives (off without a bucket).
    #[command(flatten)]
    pub archives: archives::ArchiveFlags,
    /// Stripe (billing is off without a secret key).
    #[command(flatten)]
    pub stripe: payments::StripeFlags,
    /// The SMTP server mail goes to, and its sender.
    #[command(flatten)]
    pub mail: mail::MailFlags,
}

/// The process-wide Prometheus recorder (installed once), with every
/// metric of the scheduler described.
pub fn metrics_handle() -> PrometheusHandle {
    clawdeploy_common::metrics::install(telemetry::CATALOG, telemetry::BUCKETS)
        .expect("one metrics recorder per process")
}

pub use crypto::key_from;

/// Runs the scheduler on the given listeners until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pools = opts
        .db
        .connect_pools(&opts.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    db::migrate(&pools.requests)
        .await
        .context("running migrations")?;
    let secrets = key_from(opts.secret_key.as_deref(), &opts.data_dir)?;

    let ca = crypto::pki::Ca::load_or_create(&opts.data_dir)?;
    let server_cert = ca.issue(
        &crypto::pki::Identity::Scheduler,
        &opts.grpc_server_names,
        Duration::from_secs(30 * 24 * 3600),
    )?;
    // The chain carries the CA, so a joining node can check it against its
    // pin. Client certificates are optional at the TLS layer only because
    // `Join` is made without one; every other RPC requires one.
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            format!("{}{}", server_cert.cert_pem, ca.cert_pem()),
            &server_cert.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        .client_auth_optional(true);

    let metrics = metrics_handle();
    let stripe = match &opts.stripe.stripe_secret_key {
        Some(key) => {
            let base = &opts.stripe.stripe_api_base;
            tracing::info!(base, "billing through Stripe");
            Some(payments::StripeProvider::new(key, base).context("configuring Stripe")?)
        }
        None => None,
    };
    let archives = match opts.archives.config() {
        Some(cfg) => {
            tracing::info!(
                endpoint = cfg.endpoint,
                bucket = cfg.bucket,
                "state archives go to object storage"
            );
            Some(archives::Archives::new(&cfg).context("configuring the archive store")?)
        }
        None => None,
    };
    let app = App::with_stripe(
        opts.cfg.clone(),
        pools,
        secrets,
        ca,
        opts.admin_token.as_deref(),
        archives,
        stripe,
    );
    if app.cfg.stripe_webhook_secret.is_some() {
        tracing::info!(
            api_version = billing::webhook::api_version(),
            "Stripe webhooks are read as this API version: the endpoint must be created with it"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let moved = crypto::envelope::migrate_legacy(&app.db, &app.secrets)
        .await
        .context("moving provider keys into per-instance envelopes")?;
    if moved > 0 {
        tracing::info!(instances = moved, "provider keys moved into envelopes");
    }
    fleet::settings::seed(&app)
        .await
        .context("seeding the pool settings")?;
    let mailer = mail::SmtpMailer::from_flags(&opts.mail).context("configuring mail")?;
    let mut tasks = background::Driver::new(app.clone(), stop_rx.clone());
    background::start_all(&mut tasks, mailer);
    tokio::spawn(background::peer_events::run(app.clone(), stop_rx.clone()));
    let grpc_server = tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            clawdeploy_proto::agent_session_server::AgentSessionServer::new(
                rpc::agent::AgentService { app: app.clone() },
            ),
        )
        .add_service(
            clawdeploy_proto::node_enrollment_server::NodeEnrollmentServer::new(
                rpc::enroll::EnrollmentService { app: app.clone() },
            ),
        )
        .add_service(clawdeploy_proto::route_watch_server::RouteWatchServer::new(
            rpc::routes::RouteService { app: app.clone() },
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            wait_stop(stop_rx.clone()),
        );
    let http_server = axum::serve(
        http,
        api::router(app.clone(), metrics)
            .into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(wait_stop(stop_rx.clone()));
    tracing::info!("scheduler serving");
    // Agent sessions and route watches are endless streams, so graceful
    // shutdown gets a short grace period, then the servers are dropped.
    let servers = async { tokio::join!(grpc_server, http_server) };
    let grace = async {
        wait_stop(stop_rx.clone()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    tokio::select! {
        (g, h) = servers => {
            g.context("gRPC server")?;
            h.context("HTTP server")?;
        }
        _ = grace => tracing::info!("grace period over; closing open streams"),
    }
    // A run under way finishes (the pool manager then lets its lock go),
    // within bounds: a certificate order may wait on its CA.
    if tokio::time::timeout(Duration::from_secs(5), tasks.join())
        .await
        .is_err()
    {
        tracing::warn!("background tasks still running at shutdown; dropped");
    }
    app.db.close().await;
    app.agents_db.close().await;
    Ok(())
}

async fn wait_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
