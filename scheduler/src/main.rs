//! `clawdeploy-scheduler`: parses configuration, sets up tracing, and runs
//! the scheduler library (or one of its operator commands).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use clawdeploy_scheduler::crypto::pki::{Ca, Identity};
use clawdeploy_scheduler::{serve, ServeOptions};

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

/// `serve`: the listeners, and everything else the library takes.
#[derive(Parser)]
struct ServeArgs {
    #[arg(long, env = "CLAWDEPLOY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    #[arg(long, env = "CLAWDEPLOY_GRPC_LISTEN", default_value = "127.0.0.1:7443")]
    grpc_listen: SocketAddr,
    #[command(flatten)]
    opts: ServeOptions,
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
            serve(a.opts, http, grpc, clawdeploy_common::shutdown::signal()).await
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
                "KEK {} → {}: {} data keys re-wrapped, {} gateway tokens, {} stored answers, {} certificate keys, {} mail secrets and {} TOTP secrets re-sealed; new key in {}",
                old.id(),
                new.id(),
                done.data_keys,
                done.gateway_tokens,
                done.idempotent_answers,
                done.certificate_keys,
                done.mail_secrets,
                done.totp_secrets,
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
