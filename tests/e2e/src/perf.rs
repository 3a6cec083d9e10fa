//! Measurements the benchmarks take of processes and the machine: memory
//! (RSS), CPU time (user and kernel), CPU by command, and `perf` reports.

use std::collections::HashMap;
use std::process::Command;

use anyhow::Result;

/// Resident memory of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used, from /proc.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split_secs(pid).map(|c| c.user + c.kernel)
}

/// A process's CPU time, in seconds, split by where it was spent.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSplit {
    pub user: f64,
    /// In the kernel on the process's behalf (its system calls, and the
    /// network stack work they do).
    pub kernel: f64,
}

/// CPU time a process has used in user space and in the kernel, from /proc.
pub fn cpu_split_secs(pid: u32) -> Option<CpuSplit> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i)?.parse::<f64>().ok();
    Some(CpuSplit {
        user: ticks(11)? / 100.0,
        kernel: ticks(12)? / 100.0,
    })
}

/// Busy and total CPU time of the whole machine, from /proc/stat.
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// CPU seconds used so far by every process on the machine, summed by
/// command name (for attributing a benchmark's load).
pub fn cpu_by_command() -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        // A kernel worker renames itself after the work queue it serves
        // ("kworker/u8:2-ext4-rsv-conversion"): summed under one name, or
        // a rename during a run would count its whole lifetime as new.
        let name = if name.starts_with("kworker/") {
            "kworker".to_owned()
        } else {
            name
        };
        if let Some(secs) = cpu_secs(pid) {
            *out.entry(name.clone()).or_insert(0.0) += secs;
        }
        // Bytes written to storage, in MB, under "<name> (write MB)".
        if let Some(w) = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find(|l| l.starts_with("write_bytes:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
        {
            *out.entry(format!("{name} (write MB)")).or_insert(0.0) += w / 1e6;
        }
    }
    out
}

/// Stops a `perf record` (it writes its file on SIGINT), then prints
/// `perf report` of `data` once per `(sort keys, percent limit, lines)`:
/// the benchmarks' profiles.
pub fn perf_report(
    mut recording: std::process::Child,
    data: &std::path::Path,
    views: &[(&str, &str, usize)],
) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-INT", &recording.id().to_string()])
        .status();
    let _ = recording.wait();
    for (sort, limit, lines) in views {
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--sort", sort, "--percent-limit", limit, "-i"])
            .arg(data)
            .output()?;
        println!("by {sort}:");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(*lines)
        {
            println!("{line}");
        }
    }
    Ok(())
}
