//! Network faults between a client (an agent, the edge) and the scheduler,
//! made for real on loopback: each such client reaches the scheduler
//! through a relay of its own (a plain TCP forwarder on its own port, which
//! can add latency), and the kernel drops that port's packets when told
//! (`iptables -j DROP`, all of them or a random share): a silent network,
//! not a refused one. TLS runs end to end through the relay.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::free_addr;

/// A TCP forwarder from its own loopback port to `target`.
pub struct Relay {
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let addr = free_addr();
        let listener = TcpListener::bind(addr).await.context("binding a relay")?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::join!(pipe(cr, uw, delay.clone()), pipe(ur, cw, delay));
                });
            }
        });
        Ok(Relay {
            addr,
            delay_ms,
            task,
        })
    }

    /// One-way latency added to every byte from now on (both directions).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Drops every packet to and from the relay's port until the guard is
    /// dropped: connections stay open and hear nothing.
    pub fn blackhole(&self) -> Result<Drops> {
        Drops::install(self.addr.port(), None)
    }

    /// Drops `share` (0 to 1) of the packets to and from the relay's port,
    /// at random, until the guard is dropped.
    pub fn lossy(&self, share: f64) -> Result<Drops> {
        Drops::install(self.addr.port(), Some(share))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction, each chunk held back by the current delay (a
/// latency, not a bandwidth limit: chunks queue behind each other).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = tokio::time::Instant::now()
                        + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// `iptables` rules dropping a loopback port's packets both ways; removed
/// on drop.
pub struct Drops {
    rules: Vec<Vec<String>>,
}

impl Drops {
    fn install(port: u16, share: Option<f64>) -> Result<Self> {
        let mut rules = Vec::new();
        for dir in ["--dport", "--sport"] {
            let mut rule: Vec<String> = ["INPUT", "-i", "lo", "-p", "tcp", dir, &port.to_string()]
                .map(String::from)
                .to_vec();
            if let Some(p) = share {
                rule.extend(
                    [
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &format!("{p:.2}"),
                    ]
                    .map(String::from),
                );
            }
            rule.extend(
                [
                    "-m",
                    "comment",
                    "--comment",
                    "clawdeploy-e2e-fault",
                    "-j",
                    "DROP",
                ]
                .map(String::from),
            );
            iptables("-I", &rule)?;
            rules.push(rule);
        }
        Ok(Drops { rules })
    }
}

impl Drop for Drops {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = iptables("-D", rule);
        }
    }
}

fn iptables(op: &str, rule: &[String]) -> Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .context("running iptables")?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {op} {rule:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
