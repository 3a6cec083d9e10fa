//! The rounds: each proxy in turn, their CPU in groups of their own, the
//! medians, and the profile.

use super::*;

/// Each proxy in a CPU cgroup of its own, as its systemd service is on a
/// real host.
pub(crate) fn own_groups(c: &Cluster, peers: &[Peer; 3]) -> Vec<CpuGroup> {
    let services: Vec<(String, Vec<u32>)> = peers
        .iter()
        .filter_map(|p| {
            let pid = p.child.as_ref().map(Child::id).or(c.edge_pid())?;
            Some((p.name.to_owned(), tree(pid)))
        })
        .collect();
    cgroup::own_groups(&services)
}

/// `clawdeploy_edge_upstream_connects_total` as the edge's metrics show it.
pub(crate) fn upstream_connects(c: &Cluster) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{}/metrics", c.edge_admin)])
        .output()
        .ok()?;
    clawdeploy_e2e::metric_value(
        &String::from_utf8_lossy(&out.stdout),
        "clawdeploy_edge_upstream_connects_total",
    )
}

/// Rounds of (edge, nginx, Caddy) on `path`, HTTP/1.1 then HTTP/2, and
/// the medians. Each round runs one protocol through every proxy back to
/// back, edge and nginx swapping places every other round, so that a
/// machine whose speed drifts (a shared virtual machine's does, by 10–20%
/// over seconds) favours neither; the edge/nginx ratio is also taken round
/// by round, from runs seconds apart, and its median reported.
pub(crate) fn series(
    c: &Cluster,
    peers: &[Peer; 3],
    gw: &str,
    path: &str,
    a: &Args,
    links: Option<&Links>,
) -> Result<()> {
    println!("\n## {path}");
    let mut h1: Vec<Vec<Run>> = vec![Vec::new(); 3];
    let mut h2: Vec<Vec<Run>> = vec![Vec::new(); 3];
    for round in 0..a.rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [1, 0, 2] };
        for http2 in [false, true] {
            for i in order {
                let p = &peers[i];
                let pid = p
                    .child
                    .as_ref()
                    .map(Child::id)
                    .or(c.edge_pid())
                    .context("pid")?;
                let cpu_before = tree_cpu_secs(pid);
                let connects_before = upstream_connects(c);
                let packets_before = links.and_then(Links::count);
                let mut r = if http2 {
                    let log = c.dir.join(format!("h2load-{}.log", p.name));
                    h2load(p.addr, gw, path, a, &log)?
                } else {
                    wrk(p.addr, gw, path, a)?
                };
                let cpu_after = tree_cpu_secs(pid);
                let requests = r.rps * a.duration as f64;
                r.kernel_us = (cpu_after.kernel - cpu_before.kernel) * 1e6 / requests;
                r.cpu_us = (cpu_after.user - cpu_before.user) * 1e6 / requests + r.kernel_us;
                r.packets = match (packets_before, links.and_then(Links::count)) {
                    (Some(before), Some(after)) => Some(Packets {
                        bridge: (after.bridge - before.bridge) / requests,
                        loopback: (after.loopback - before.loopback) / requests,
                    }),
                    _ => None,
                };
                // The edge's own count: a pool that kept its connections
                // opens none during a run.
                let connects = match (i, connects_before, upstream_connects(c)) {
                    (0, Some(b), Some(a)) => format!(", {:.0} upstream connections opened", a - b),
                    _ => String::new(),
                };
                println!(
                    "round {round} {:<6} {:<6} {:>6.0} req/s p99 {:>6.2} ms {:>4.0} µs CPU/req ({:.0} in the kernel){connects}",
                    p.name,
                    if http2 { "h2load" } else { "wrk" },
                    r.rps,
                    r.p99_ms,
                    r.cpu_us,
                    r.kernel_us
                );
                let runs = if http2 { &mut h2 } else { &mut h1 };
                runs[i].push(r);
            }
        }
    }
    let memory: Vec<u64> = peers
        .iter()
        .map(|p| match &p.child {
            Some(child) => tree_rss_kib(child.id()),
            None => c.edge_pid().and_then(rss_kib).unwrap_or(0),
        })
        .collect();
    for (label, runs) in [("HTTP/1.1 (wrk)", &h1), ("HTTP/2 (h2load)", &h2)] {
        let m: Vec<Run> = runs.iter().map(|r| median(r.clone())).collect();
        println!("\n{path}, {label}, medians of {} rounds:", a.rounds);
        println!(
            "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | of which kernel | packets/req bridge, loopback | errors | RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (i, name) in PROXIES.iter().enumerate() {
            let packets = m[i].packets.map_or("-".into(), |p| {
                format!("{:.2}, {:.2}", p.bridge, p.loopback)
            });
            println!(
                "| {name} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {packets} | {} | {} |",
                m[i].rps,
                m[i].p50_ms,
                m[i].p99_ms,
                m[i].cpu_us,
                m[i].kernel_us,
                m[i].errors,
                memory[i] / 1024
            );
        }
        println!(
            "{path} {label}: edge/nginx throughput {:.2}×, p99 {:.2}×, CPU per request {:.2}×; edge/Caddy throughput {:.2}×, p99 {:.2}×, CPU per request {:.2}×",
            m[0].rps / m[1].rps,
            m[0].p99_ms / m[1].p99_ms,
            m[0].cpu_us / m[1].cpu_us,
            m[0].rps / m[2].rps,
            m[0].p99_ms / m[2].p99_ms,
            m[0].cpu_us / m[2].cpu_us
        );
        let mut paired: Vec<f64> = runs[0]
            .iter()
            .zip(&runs[1])
            .map(|(edge, nginx)| edge.rps / nginx.rps)
            .collect();
        paired.sort_by(f64::total_cmp);
        println!(
            "{path} {label}: edge/nginx throughput round by round: median {:.2}× (from {:.2}× to {:.2}×, {} of {} rounds at or above 1.0×)",
            paired[paired.len() / 2],
            paired[0],
            paired[paired.len() - 1],
            paired.iter().filter(|r| **r >= 1.0).count(),
            paired.len()
        );
    }
    Ok(())
}

/// `perf record` of the edge during a wrk run on the first path, and the
/// top of its report (by symbol, children excluded).
pub(crate) fn profile(c: &Cluster, edge: &Peer, gw: &str, a: &Args) -> Result<()> {
    let pid = c.edge_pid().context("edge pid")?;
    let data = c.dir.join("edge.perf.data");
    let rec = Command::new("perf")
        // DWARF call graphs (release builds keep no frame pointers), so the
        // kept recording can be read with its callers.
        .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let path = a.paths.first().map_or("/healthz", String::as_str);
    let run = wrk(edge.addr, gw, path, a)?;
    println!(
        "\nperf profile of the edge under wrk on {path} ({:.0} req/s while recorded):",
        run.rps
    );
    // Where the time goes by binary (kernel, the edge, libc), then the
    // hottest functions, the edge's threads taken together.
    clawdeploy_e2e::perf_report(rec, &data, &[("dso", "1", 8), ("sym", "0.5", 40)])?;
    // Kept past the system's own directory, to read further (`perf report
    // -i target/bench/edge.perf.data --children`).
    let keep = Path::new("target/bench");
    std::fs::create_dir_all(keep)?;
    std::fs::copy(&data, keep.join("edge.perf.data"))?;
    println!(
        "recording kept at {}",
        keep.join("edge.perf.data").display()
    );
    Ok(())
}
