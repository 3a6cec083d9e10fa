//! Where a burst's CPU goes: by process (part), by SQL statement
//! (pg_stat_statements), and perf's profile.

use super::*;

/// Which part of the system a process belongs to, by its command name
/// (as `/proc/<pid>/stat` shows it, at most 15 characters).
pub(crate) fn part_of(command: &str) -> &'static str {
    match command {
        c if c.starts_with("clawdeploy-sche") => "scheduler",
        c if c.starts_with("clawdeploy-agen") => "agents",
        c if c.starts_with("clawdeploy-edge") => "edge",
        c if c.starts_with("clawdeploy-benc") => "bench client",
        "postgres" => "PostgreSQL",
        "dockerd" | "containerd" | "docker-proxy" | "runc" | "docker-init" => "dockerd",
        c if c.starts_with("containerd-shim") || c.starts_with("fuse-overlayfs") => "dockerd",
        c if c.starts_with("openclaw") => "containers",
        _ => "other",
    }
}

/// The CPU seconds each part used between two `cpu_by_part` readings.
/// A part whose processes exited in between reads less afterwards than
/// before: it counts as nothing here, and what its exited processes used
/// shows under "exited + kernel".
pub(crate) fn cpu_between(
    before: &std::collections::BTreeMap<&'static str, f64>,
    after: &std::collections::BTreeMap<&'static str, f64>,
) -> Vec<(&'static str, f64)> {
    after
        .iter()
        .map(|(part, a)| {
            let used = a - before.get(part).copied().unwrap_or(0.0);
            (*part, used.max(0.0))
        })
        .collect()
}

/// CPU seconds used so far, by part of the system.
pub(crate) fn cpu_by_part() -> std::collections::BTreeMap<&'static str, f64> {
    let mut parts = std::collections::BTreeMap::new();
    for (command, secs) in cpu_by_command() {
        if command.ends_with("(write MB)") {
            continue;
        }
        *parts.entry(part_of(&command)).or_insert(0.0) += secs;
    }
    parts
}

/// The database's own account of a burst (pg_stat_statements, which
/// scripts/lib.sh loads): statements run per signup and the costliest.
pub(crate) struct Statements(pub(crate) bool);

impl Statements {
    pub(crate) async fn start(c: &Cluster) -> Self {
        let ok = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&c.db)
            .await
            .is_ok()
            && sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&c.db)
                .await
                .is_ok();
        if !ok {
            eprintln!("pg_stat_statements is not loaded: no statement counts (scripts/lib.sh starts PostgreSQL with it)");
        }
        Self(ok)
    }

    /// The statements run since `start`: text, calls, milliseconds.
    pub(crate) async fn read(&self, c: &Cluster) -> Result<Vec<(String, i64, f64)>> {
        if !self.0 {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND query NOT LIKE '%pg_stat_statements%'
              ORDER BY total_exec_time DESC",
        )
        .fetch_all(&c.db)
        .await?)
    }

    pub(crate) fn report(&self, rows: &[(String, i64, f64)], n: usize) {
        if !self.0 {
            return;
        }
        let calls: i64 = rows.iter().map(|r| r.1).sum();
        let ms: f64 = rows.iter().map(|r| r.2).sum();
        println!(
            "statements during the burst: {calls} ({:.1} per signup), {ms:.0} ms executing in all; the costliest:",
            calls as f64 / n as f64
        );
        for (query, calls, total) in rows.iter().take(8) {
            let short: String = query.chars().take(110).collect();
            println!("  {total:>7.1} ms {calls:>5}× {short}");
        }
        let mut by_calls = rows.to_vec();
        by_calls.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("the most frequent:");
        for (query, calls, total) in by_calls.iter().take(30) {
            let short: String = query.chars().take(110).collect();
            println!("  {calls:>5}× {total:>7.1} ms {short}");
        }
    }
}

/// `perf record` of every CPU, until `report_perf`.
pub(crate) fn start_perf(dir: &std::path::Path) -> Result<std::process::Child> {
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-F", "1999", "-o"])
        .arg(dir.join("burst.perf.data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Stops the recording and prints where the machine's CPU went: by
/// command, then the hottest functions.
pub(crate) fn report_perf(rec: std::process::Child, dir: &std::path::Path) -> Result<()> {
    println!("perf profile of the whole machine during the burst:");
    let data = dir.join("burst.perf.data");
    clawdeploy_e2e::perf_report(
        rec,
        &data,
        &[("comm", "1", 12), ("comm,dso,sym", "0.7", 25)],
    )?;
    // Kept past the system's own directory, to read further (`perf report
    // -i target/bench/burst.perf.data --comm postgres`).
    let keep = std::path::Path::new("target/bench");
    std::fs::create_dir_all(keep)?;
    std::fs::copy(&data, keep.join("burst.perf.data"))?;
    println!(
        "recording kept at {}",
        keep.join("burst.perf.data").display()
    );
    Ok(())
}
