//! End-to-end harness: a whole ClawDeploy system as separate processes (the
//! scheduler, node agents and the edge) against a fresh PostgreSQL database
//! and the real Docker engine. Used by the tests in `tests/` and by the
//! benchmark binaries.
//!
//! Its rooms: `cluster` (options, start and teardown; `cluster/processes`
//! spawns and stops single processes), `client` (the HTTP API and requests
//! through the edge), `probes` (database rows, Docker, metrics), `perf`
//! (memory and CPU for the benchmarks), `smtp` (a real SMTP server and its
//! Maildir), and the helpers below. The crate's
//! binaries live apart: stand-ins for external services in `standins/`,
//! benchmark drivers (signup, edge, migration, the fleet simulator, the
//! soak) in `bench/`.
//!
//! Needs what `scripts/test` sets up: the binaries built, the stand-in image,
//! and `CLAWDEPLOY_TEST_PG` pointing at a local PostgreSQL server.

pub mod acme;
pub mod cgroup;
mod client;
mod cluster;
pub mod edge_client;
pub mod invariants;
pub mod llm;
pub mod netfault;
pub mod ops;
pub mod perf;
pub mod pg;
mod probes;
pub mod smtp;
pub mod totp;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use cluster::{Cluster, ClusterOptions, ADMIN_TOKEN};
pub use perf::*;
pub use probes::{docker_cleanup_node, metric_value};

pub const BASE_DOMAIN: &str = "clawdeploy.localhost";

/// Where the workspace's binaries are (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CLAWDEPLOY_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A loopback port for a test process to listen on. Taken from below the
/// kernel's ephemeral range (32768+), where port 0 would pick: there, any
/// outgoing connection of a parallel test could take the port between this
/// check and the process's bind. Never handed out twice per test binary.
pub fn free_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % 22_000) as u16;
        let mut used = HANDED_OUT.lock().unwrap();
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.push(port);
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `within` passes.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
