//! The load generators (wrk for HTTP/1.1, h2load for HTTP/2), what a run
//! measured, and the processes' memory and CPU.

use super::*;

/// A duration in wrk's notation (`950.00us`, `1.23ms`, `2.00s`), in ms.
pub(crate) fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
    /// The proxy's own CPU time per request, in microseconds: what it costs
    /// whatever else shares the machine.
    pub(crate) cpu_us: f64,
    /// Of which in the kernel: its system calls and the network stack
    /// work they do, which a proxy's own code can only avoid by making
    /// fewer of them.
    pub(crate) kernel_us: f64,
    /// Packets per request on the tenant's bridge (both ways) and on
    /// loopback (the client's side), when the counters could be read.
    pub(crate) packets: Option<Packets>,
}

/// Packets per request, or packet counts, on the two links a request
/// crosses: the bridge to the tenant and loopback to the client.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Packets {
    pub(crate) bridge: f64,
    pub(crate) loopback: f64,
}

/// The interfaces whose counters say how many packets a proxy sent and
/// received for its requests.
pub(crate) struct Links {
    /// The interface the route to the tenant leaves by (its Docker bridge).
    pub(crate) bridge: String,
}

impl Links {
    /// The links to `upstream` (`ip:port`), found with `ip route get`.
    pub(crate) fn to(upstream: &str) -> Option<Self> {
        let ip = upstream.rsplit_once(':')?.0;
        let out = Command::new("ip")
            .args(["-o", "route", "get", ip])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "dev")?;
        Some(Self {
            bridge: words.next()?.to_owned(),
        })
    }

    pub(crate) fn count(&self) -> Option<Packets> {
        let read = |dev: &str, dir: &str| -> Option<f64> {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{dir}_packets"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Packets {
            // Received and sent: the bridge carries both ways.
            bridge: read(&self.bridge, "rx")? + read(&self.bridge, "tx")?,
            // Loopback receives every packet it sends: count one side.
            loopback: read("lo", "rx")?,
        })
    }
}

pub(crate) fn wrk(addr: SocketAddr, gw: &str, path: &str, a: &Args) -> Result<Run> {
    let out = Command::new("wrk")
        .args([
            &format!("-t{}", a.wrk_threads),
            &format!("-c{}", a.concurrency),
        ])
        .arg(format!("-d{}s", a.duration))
        .arg("--latency")
        .args(["-H", &format!("Host: alice.{BASE_DOMAIN}")])
        .args(["-H", &format!("Authorization: Bearer {gw}")])
        .arg(format!("https://{addr}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line_value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rps = line_value("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    let p50_ms = line_value("50%").and_then(wrk_ms).context("wrk p50")?;
    let p99_ms = line_value("99%").and_then(wrk_ms).context("wrk p99")?;
    let non_2xx = line_value("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors = text.lines().any(|l| l.contains("Socket errors"));
    Ok(Run {
        rps,
        p50_ms,
        p99_ms,
        errors: non_2xx + u64::from(socket_errors),
        cpu_us: 0.0,
        kernel_us: 0.0,
        packets: None,
    })
}

pub(crate) fn h2load(addr: SocketAddr, gw: &str, path: &str, a: &Args, log: &Path) -> Result<Run> {
    let streams = a.h2_streams.max(1);
    let conns = a.h2_connections.max(1);
    let out = Command::new("h2load")
        .args([
            &format!("-t{}", a.wrk_threads),
            &format!("-c{conns}"),
            &format!("-m{streams}"),
        ])
        .args(["-D", &a.duration.to_string()])
        .args(["-H", &format!(":authority: alice.{BASE_DOMAIN}")])
        .args(["-H", &format!("authorization: Bearer {gw}")])
        .arg("--log-file")
        .arg(log)
        .arg(format!("https://{addr}{path}"))
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    // status\tduration per request: percentiles from the log.
    let mut durations = Vec::new();
    let mut errors = 0;
    for line in std::fs::read_to_string(log)?.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 3 {
            continue;
        }
        if cols[1] != "200" {
            errors += 1;
        }
        if let Ok(us) = cols[2].parse::<f64>() {
            durations.push(us / 1000.0);
        }
    }
    ensure!(!durations.is_empty(), "h2load logged no requests: {text}");
    durations.sort_by(f64::total_cmp);
    let pick = |p: f64| durations[((durations.len() as f64 * p) as usize).min(durations.len() - 1)];
    Ok(Run {
        rps,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        errors,
        cpu_us: 0.0,
        kernel_us: 0.0,
        packets: None,
    })
}

pub(crate) fn median(mut v: Vec<Run>) -> Run {
    v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mut m = v[v.len() / 2];
    let mut p99: Vec<f64> = v.iter().map(|r| r.p99_ms).collect();
    p99.sort_by(f64::total_cmp);
    m.p99_ms = p99[p99.len() / 2];
    m.errors = v.iter().map(|r| r.errors).sum();
    let middle = |f: fn(&Run) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    m.cpu_us = middle(|r| r.cpu_us);
    m.kernel_us = middle(|r| r.kernel_us);
    m.packets = v.iter().all(|r| r.packets.is_some()).then(|| Packets {
        bridge: middle(|r| r.packets.map_or(0.0, |p| p.bridge)),
        loopback: middle(|r| r.packets.map_or(0.0, |p| p.loopback)),
    });
    m
}

/// A process and its children (nginx's workers).
pub(crate) fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
    }
    pids
}

pub(crate) fn tree_rss_kib(root: u32) -> u64 {
    tree(root).into_iter().filter_map(rss_kib).sum()
}

pub(crate) fn tree_cpu_secs(root: u32) -> CpuSplit {
    tree(root)
        .into_iter()
        .filter_map(cpu_split_secs)
        .fold(CpuSplit::default(), |a, c| CpuSplit {
            user: a.user + c.user,
            kernel: a.kernel + c.kernel,
        })
}
