//! Let's Encrypt's test CA for `scripts/run-local`: Debian's pebble and
//! pebble-challtestsrv on fixed loopback ports, until SIGTERM or Ctrl-C.
//! Writes, into `--out`, what tools and the scheduler need: `acme-root.pem`
//! (pebble's issuing root: what a client trusts to verify a custom
//! domain's certificate), `acme-tls-ca.pem` (the root of pebble's own HTTPS
//! listener: the scheduler's `--acme-ca-bundle`) and `dns-management-url`
//! (challtestsrv's management API: set a TXT record with one `curl`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use clawdeploy_e2e::acme::{Pebble, PebbleAddrs};

#[derive(Parser)]
struct Args {
    /// Pebble's state and logs.
    #[arg(long, env = "ACME_STANDIN_DIR")]
    dir: PathBuf,
    /// Where the files for tools go.
    #[arg(long, env = "ACME_STANDIN_OUT")]
    out: PathBuf,
    /// The edge's plain HTTP port: where the CA validates HTTP-01.
    #[arg(long, env = "ACME_STANDIN_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    #[arg(long, env = "ACME_STANDIN_LISTEN", default_value = "127.0.0.1:14000")]
    listen: SocketAddr,
    #[arg(
        long,
        env = "ACME_STANDIN_MANAGEMENT",
        default_value = "127.0.0.1:15000"
    )]
    management: SocketAddr,
    #[arg(long, env = "ACME_STANDIN_DNS", default_value = "127.0.0.1:8053")]
    dns: SocketAddr,
    #[arg(
        long,
        env = "ACME_STANDIN_DNS_MANAGEMENT",
        default_value = "127.0.0.1:8055"
    )]
    dns_management: SocketAddr,
    /// How long issued certificates are valid.
    #[arg(long, env = "ACME_STANDIN_VALIDITY_SECS", default_value_t = 90 * 24 * 3600)]
    validity_secs: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let addrs = PebbleAddrs {
        acme: a.listen,
        acme_management: a.management,
        dns: a.dns,
        dns_management: a.dns_management,
    };
    let pebble = Pebble::start_at(&a.dir, addrs, a.http_port, a.validity_secs).await?;
    std::fs::create_dir_all(&a.out)?;
    pebble.issuing_root(&a.out.join("acme-root.pem")).await?;
    std::fs::copy(&pebble.tls_ca, a.out.join("acme-tls-ca.pem"))?;
    std::fs::write(
        a.out.join("dns-management-url"),
        format!("{}\n", pebble.management),
    )?;
    println!("ACME directory {} ready", pebble.directory_url);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(pebble);
    Ok(())
}
