//! Host facts for heartbeats: CPU busy since the last sample (/proc/stat),
//! available memory (/proc/meminfo) and the state disk's free space
//! (statvfs, through rustix's safe wrapper: the workspace forbids unsafe
//! code, and running `df` cost a process per heartbeat).

use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostUsage {
    pub cpu_busy_permille: u32,
    pub memory_available_bytes: u64,
    pub disk_available_bytes: u64,
    pub disk_total_bytes: u64,
}

/// Samples host usage; remembers the previous CPU counters and the last
/// sample.
pub struct HostSampler {
    state_dir: PathBuf,
    last_cpu: Mutex<Option<(u64, u64)>>,
    last: Mutex<Option<(std::time::Instant, HostUsage)>>,
}

impl HostSampler {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            last_cpu: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// The last sample if it is younger than `max_age`, else a new one.
    /// Heartbeats sent at once on a container change (the claim path) take
    /// the last one rather than read the host again.
    pub async fn recent(&self, max_age: std::time::Duration) -> HostUsage {
        if let Some((at, usage)) = *self.last.lock().unwrap() {
            if at.elapsed() < max_age {
                return usage;
            }
        }
        self.sample().await
    }

    pub async fn sample(&self) -> HostUsage {
        let cpu = read_cpu().map(|now| {
            let mut last = self.last_cpu.lock().unwrap();
            let busy = match *last {
                Some((busy0, total0)) if now.1 > total0 => {
                    ((now.0.saturating_sub(busy0)) * 1000 / (now.1 - total0)) as u32
                }
                _ => 0,
            };
            *last = Some(now);
            busy
        });
        let (disk_available_bytes, disk_total_bytes) = disk_space(&self.state_dir);
        let usage = HostUsage {
            cpu_busy_permille: cpu.unwrap_or(0),
            memory_available_bytes: meminfo("MemAvailable:").unwrap_or(0),
            disk_available_bytes,
            disk_total_bytes,
        };
        *self.last.lock().unwrap() = Some((std::time::Instant::now(), usage));
        usage
    }
}

/// (busy, total) jiffies over all CPUs.
fn read_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// A `/proc/meminfo` field, in bytes.
pub fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// (available, total) bytes of the file system holding `dir`, as `df`
/// counts them (blocks free to unprivileged users, and all blocks, in
/// fragment units); (0, 0), "not reported", when it cannot be read.
fn disk_space(dir: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(fs) => (
            fs.f_bavail.saturating_mul(fs.f_frsize),
            fs.f_blocks.saturating_mul(fs.f_frsize),
        ),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "state disk's free space not read");
            (0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn samples_real_host_numbers() {
        let s = HostSampler::new(std::env::temp_dir());
        s.sample().await;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let u = s.sample().await;
        assert!(u.memory_available_bytes > 0);
        assert!(u.disk_total_bytes >= u.disk_available_bytes && u.disk_total_bytes > 0);
        assert!(u.cpu_busy_permille <= 1000);
    }

    #[test]
    fn disk_space_agrees_with_df() {
        let dir = std::env::temp_dir();
        let out = std::process::Command::new("df")
            .args(["-P", "-B1"])
            .arg(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let f: Vec<u64> = text
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        let (avail, total) = disk_space(&dir);
        assert_eq!(total, f[0]);
        // Other writers may move the free space between the two reads.
        assert!(avail.abs_diff(f[2]) < 64 << 20, "{avail} vs {}", f[2]);
        assert_eq!(disk_space(std::path::Path::new("/no/such/dir")), (0, 0));
    }
}
