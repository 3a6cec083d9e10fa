//! The edge in depth, on the real system: TLS with a wildcard certificate
//! (HTTP/1.1 and HTTP/2, reloads), WebSockets and server-sent events,
//! streamed uploads, header hygiene, limits and timeouts, releases, and a
//! restart without the scheduler.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clawdeploy_e2e::edge_client::{body, EdgeConn, PublicPki, ReqBody};
use clawdeploy_e2e::{peak_rss_kib, wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use futures::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn host(sub: &str) -> String {
    format!("{sub}.{BASE_DOMAIN}")
}

async fn one_node(opts: ClusterOptions) -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        ..opts
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    Ok(c)
}

/// Reads from `s` until it closes; how long that took.
async fn time_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), s.read(&mut buf)).await {
            Err(_) => anyhow::bail!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

mod limits;
mod restarts;
mod streams;
mod tls;
