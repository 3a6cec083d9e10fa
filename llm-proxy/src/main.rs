//! `clawdeploy-llm-proxy`: parses configuration and runs the proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clawdeploy_common::sealed::SecretBox;
use clawdeploy_llm_proxy::ledger::Ledger;
use clawdeploy_llm_proxy::limits::Limits;
use clawdeploy_llm_proxy::money::Micros;
use clawdeploy_llm_proxy::prices::Prices;
use clawdeploy_llm_proxy::state::{upstream_client, CreditsUpstream, Proxy, Upstreams};
use clawdeploy_llm_proxy::tenant::Tenants;
use clawdeploy_llm_proxy::usage::{self, Recorder};
use clawdeploy_llm_proxy::{server, telemetry};

#[derive(Parser)]
#[command(
    name = "clawdeploy-llm-proxy",
    version,
    about = "ClawDeploy metering proxy for model access"
)]
struct Args {
    /// Where tenants' gateways reach the proxy.
    #[arg(
        long,
        env = "CLAWDEPLOY_LLM_PROXY_LISTEN",
        default_value = "127.0.0.1:4319"
    )]
    listen: SocketAddr,
    #[arg(
        long,
        env = "CLAWDEPLOY_LLM_PROXY_METRICS_LISTEN",
        default_value = "127.0.0.1:9104"
    )]
    metrics_listen: SocketAddr,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_LLM_PROXY_DB_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    db_max_connections: u32,
    /// The key-encryption key (64 hex characters), the scheduler's.
    #[arg(
        long,
        env = "CLAWDEPLOY_SECRET_KEY",
        hide_env_values = true,
        conflicts_with = "secret_key_file"
    )]
    secret_key: Option<String>,
    /// A file holding the key-encryption key (the scheduler's `secret.key`).
    #[arg(long, env = "CLAWDEPLOY_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// Names this process in the leases it takes (default: host and pid).
    #[arg(long, env = "CLAWDEPLOY_LLM_PROXY_ID")]
    proxy_id: Option<String>,
    /// A provider's OpenAI-compatible base URL for customers' own keys,
    /// as name=url (repeatable; these replace the defaults).
    #[arg(
        long = "provider-url",
        env = "CLAWDEPLOY_LLM_PROVIDER_URLS",
        value_delimiter = ','
    )]
    provider_urls: Vec<String>,
    /// The platform's OpenRouter-compatible upstream for AI credits;
    /// without it credits are not sold.
    #[arg(long, env = "CLAWDEPLOY_CREDITS_UPSTREAM_URL")]
    credits_upstream_url: Option<String>,
    #[arg(
        long,
        env = "CLAWDEPLOY_CREDITS_UPSTREAM_KEY",
        hide_env_values = true,
        requires = "credits_upstream_url"
    )]
    credits_upstream_key: Option<String>,
    /// Percent over the price table charged for AI credits.
    #[arg(long, env = "CLAWDEPLOY_CREDIT_MARKUP_PERCENT", default_value_t = 20)]
    credit_markup_percent: u32,
    /// Messages a month on the free tier.
    #[arg(
        long,
        env = "CLAWDEPLOY_FREE_MESSAGES_PER_MONTH",
        default_value_t = 100
    )]
    free_messages_per_month: u32,
    /// Requests a second per instance (token bucket) and its burst, for
    /// every tier; unset: each plan's (free 10/20, pro 20/40, team 50/100).
    #[arg(long, env = "CLAWDEPLOY_LLM_RATE_PER_SEC", requires = "rate_burst")]
    rate_per_sec: Option<NonZeroU32>,
    #[arg(long, env = "CLAWDEPLOY_LLM_RATE_BURST", requires = "rate_per_sec")]
    rate_burst: Option<NonZeroU32>,
    /// How often usage is written to the database.
    #[arg(long, env = "CLAWDEPLOY_LLM_FLUSH_MS", default_value_t = 2000)]
    flush_ms: u64,
    /// A lease not renewed for this long is taken back (its proxy died).
    #[arg(long, env = "CLAWDEPLOY_LLM_LEASE_TTL_SECS", default_value_t = 30)]
    lease_ttl_secs: u64,
    /// A lease unused for this long is returned.
    #[arg(long, env = "CLAWDEPLOY_LLM_LEASE_IDLE_SECS", default_value_t = 60)]
    lease_idle_secs: u64,
    /// The most a lease grows by beyond a request's need, in micro-dollars.
    #[arg(
        long,
        env = "CLAWDEPLOY_LLM_LEASE_CHUNK_MICROS",
        default_value_t = 1_000_000
    )]
    lease_chunk_micros: u64,
    /// How long a caller's token and keys are trusted before a re-read.
    #[arg(long, env = "CLAWDEPLOY_LLM_TENANT_CACHE_SECS", default_value_t = 30)]
    tenant_cache_secs: u64,
    /// How long a stream whose client left is still read for its usage.
    #[arg(long, env = "CLAWDEPLOY_LLM_DRAIN_SECS", default_value_t = 60)]
    drain_secs: u64,
    #[arg(long, env = "CLAWDEPLOY_LLM_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// The fewest output tokens a credits request may be capped to.
    #[arg(long, env = "CLAWDEPLOY_LLM_MIN_OUTPUT_TOKENS", default_value_t = 16)]
    min_output_tokens: u64,
}

/// The providers' own OpenAI-compatible endpoints, for customers' keys.
const DEFAULT_PROVIDERS: &[(&str, &str)] = &[
    ("openai", "https://api.openai.com/v1"),
    ("anthropic", "https://api.anthropic.com/v1"),
    (
        "google",
        "https://generativelanguage.googleapis.com/v1beta/openai",
    ),
    ("openrouter", "https://openrouter.ai/api/v1"),
    ("mistral", "https://api.mistral.ai/v1"),
    ("groq", "https://api.groq.com/openai/v1"),
    ("xai", "https://api.x.ai/v1"),
    ("deepseek", "https://api.deepseek.com/v1"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clawdeploy_common::telemetry::init_tracing("info");
    let a = Args::parse();
    let kek = match (&a.secret_key, &a.secret_key_file) {
        (Some(k), _) => SecretBox::from_hex(k)?,
        (None, Some(f)) => SecretBox::from_hex(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )?,
        (None, None) => {
            anyhow::bail!("give --secret-key or --secret-key-file (the scheduler's key)")
        }
    };
    let byok: BTreeMap<String, String> = if a.provider_urls.is_empty() {
        DEFAULT_PROVIDERS
            .iter()
            .map(|(p, u)| (p.to_string(), u.to_string()))
            .collect()
    } else {
        a.provider_urls
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map(|(p, u)| (p.trim().to_ascii_lowercase(), u.trim().to_owned()))
                    .with_context(|| format!("--provider-url {s}: expected name=url"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let credits = a
        .credits_upstream_url
        .clone()
        .map(|base_url| CreditsUpstream {
            base_url,
            key: a.credits_upstream_key.clone().unwrap_or_default(),
        });
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(a.db_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&a.database_url)
        .context("the database URL")?;
    let proxy_id = a.proxy_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), std::process::id())
    });
    let metrics = clawdeploy_common::metrics::install(telemetry::CATALOG, telemetry::BUCKETS)?;
    let ledger = Arc::new(Ledger::new(
        db.clone(),
        proxy_id.clone(),
        Duration::from_secs(a.lease_ttl_secs),
        Micros(a.lease_chunk_micros),
    ));
    let recorder = Arc::new(Recorder::new(db.clone()));
    let tenants = Arc::new(Tenants::new(
        db.clone(),
        kek,
        Duration::from_secs(a.tenant_cache_secs),
    ));
    tokio::spawn(tenants.clone().follow_changes());
    let proxy = Arc::new(Proxy {
        tenants,
        ledger: ledger.clone(),
        recorder: recorder.clone(),
        limits: Limits::new(
            db.clone(),
            a.rate_per_sec.zip(a.rate_burst),
            a.free_messages_per_month,
        ),
        prices: Prices::pinned()?,
        upstreams: Upstreams { byok, credits },
        client: upstream_client(),
        markup: a.credit_markup_percent,
        max_body: a.max_body_bytes,
        drain: Duration::from_secs(a.drain_secs),
        first_byte_timeout: clawdeploy_llm_proxy::forward::DEFAULT_FIRST_BYTE_TIMEOUT,
        min_output_tokens: a.min_output_tokens,
    });
    {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                proxy.limits.sweep();
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(a.metrics_listen)
        .await
        .with_context(|| format!("binding {}", a.metrics_listen))?;
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || std::future::ready(metrics.render())),
        );
        let _ = axum::serve(metrics_listener, app).await;
    });
    let (stop_flush, flush_stopped) = tokio::sync::oneshot::channel::<()>();
    let flusher = tokio::spawn(usage::run(
        recorder,
        ledger.clone(),
        Duration::from_millis(a.flush_ms),
        Duration::from_secs(a.lease_idle_secs),
        async move {
            let _ = flush_stopped.await;
        },
    ));
    tracing::info!(listen = %a.listen, proxy_id, "llm proxy listening");
    server::serve(listener, proxy, clawdeploy_common::shutdown::signal()).await?;
    // Streams still open settle on their own; give them a moment to end
    // before the last flush returns the leases.
    ledger.wait_for_holds(Duration::from_secs(10)).await;
    let _ = stop_flush.send(());
    let _ = flusher.await;
    Ok(())
}
