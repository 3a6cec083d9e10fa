//! ClawDeploy scheduler: the source of truth (PostgreSQL), the customer API,
//! the mTLS gRPC server for agents and edges, the pool manager, assignment
//! and the platform's certificate authority.

pub mod admin;
pub mod app;
pub mod assign;
pub mod auth;
pub mod crypto;
pub mod demand;
pub mod desired;
pub mod edges;
pub mod enroll;
pub mod envelope;
pub mod error;
pub mod events;
pub mod grpc;
pub mod http;
pub mod idempotency;
pub mod instances;
pub mod openapi;
pub mod page;
pub mod password;
pub mod pki;
pub mod placement;
pub mod pool;
pub mod reconfigure;
pub mod release;
pub mod routes;
pub mod sessions;
pub mod settings;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};

pub use app::{App, AppRef, Config};

/// Everything `serve` needs besides its listeners.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub cfg: Config,
    pub database_url: String,
    /// Holds the CA (`ca.crt.pem`, `ca.key.pem`) and, when no key is given,
    /// the secret key file.
    pub data_dir: PathBuf,
    /// 64 hex characters; when absent `<data_dir>/secret.key` is used
    /// (created on first start).
    pub secret_key: Option<String>,
    /// DNS names and IPs the gRPC server certificate carries.
    pub grpc_server_names: Vec<String>,
    pub db_max_connections: u32,
    /// Bearer token for `/admin`; `None` turns the admin API off.
    pub admin_token: Option<String>,
}

/// Records one state change in the audit log. Auditing never fails the
/// operation it records; a failure is logged.
pub async fn audit<'e>(
    db: impl sqlx::PgExecutor<'e>,
    actor: &str,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) {
    let r = sqlx::query(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(detail)
    .execute(db)
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, action, subject, "audit record not written");
    }
}

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .expect("static buckets")
                .install_recorder()
                .expect("one metrics recorder per process")
        })
        .clone()
}

fn load_secret_key(opts: &ServeOptions) -> anyhow::Result<crypto::SecretBox> {
    key_from(opts.secret_key.as_deref(), &opts.data_dir)
}

/// The key-encryption key: given, or `<data_dir>/secret.key` (made when
/// missing).
pub fn key_from(
    given: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<crypto::SecretBox> {
    let hex_key = match given {
        Some(k) => k.to_owned(),
        None => {
            let path = data_dir.join("secret.key");
            if !path.exists() {
                std::fs::create_dir_all(data_dir)?;
                std::fs::write(&path, crypto::SecretBox::generate_key_hex())?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(path = %path.display(), "generated a new secret key; keep it safe, secrets are unreadable without it");
            }
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    Ok(crypto::SecretBox::from_hex(&hex_key)?)
}

/// Runs the scheduler on the given listeners until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = PgPoolOptions::new()
        .max_connections(opts.db_max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&opts.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::migrate!("../migrations")
        .run(&db)
        .await
        .context("running migrations")?;
    let secrets = load_secret_key(&opts)?;

    let ca = pki::Ca::load_or_create(&opts.data_dir)?;
    let server_cert = ca.issue(
        &pki::Identity::Scheduler,
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
    let app = App::new(
        opts.cfg.clone(),
        db,
        secrets,
        ca,
        opts.admin_token.as_deref(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let moved = envelope::migrate_legacy(&app)
        .await
        .context("moving provider keys into per-instance envelopes")?;
    if moved > 0 {
        tracing::info!(instances = moved, "provider keys moved into envelopes");
    }
    settings::seed(&app)
        .await
        .context("seeding the pool settings")?;
    let pool_task = tokio::spawn(pool::run(app.clone(), stop_rx.clone()));
    tokio::spawn(events::listen(app.clone(), stop_rx.clone()));
    let grpc_server = tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            clawdeploy_proto::agent_session_server::AgentSessionServer::new(grpc::AgentService {
                app: app.clone(),
            }),
        )
        .add_service(
            clawdeploy_proto::node_enrollment_server::NodeEnrollmentServer::new(
                enroll::EnrollmentService { app: app.clone() },
            ),
        )
        .add_service(clawdeploy_proto::route_watch_server::RouteWatchServer::new(
            grpc::RouteService { app: app.clone() },
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            wait_stop(stop_rx.clone()),
        );
    let http_server = axum::serve(
        http,
        http::router(app.clone(), metrics)
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
    let _ = pool_task.await;
    app.db.close().await;
    Ok(())
}

async fn wait_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
