//! The edge's route table: exact host → upstream, ordered per host by the
//! scheduler's route versions (a late, older delta never overrides a newer
//! one; removals leave a tombstone). A customer's own hostname also carries
//! its certificate and, while an order is open, its ACME HTTP-01 answer.
//! Persisted to a cache file (mode 0600: it holds those certificates' keys)
//! shortly after changes (coalesced, off the watch path), so a restarted
//! edge serves its last table while the scheduler is away.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use clawdeploy_proto::{Route, RouteDelta, RouteSnapshot};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub upstream: String,
    pub instance_id: String,
    pub container_id: String,
    /// Non-empty: the instance is suspended for this reason; the edge
    /// answers its requests itself (`proxy::paused`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub paused: String,
    /// The upstream pool's key for this container at this address
    /// (`upstream::key_of`), made on the route's first request.
    #[serde(skip)]
    pub(crate) pool_key: std::sync::OnceLock<Arc<str>>,
}

/// A custom hostname's certificate, as PEM (parsed by `tls` on first use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertPem {
    pub chain: String,
    pub key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    version: u64,
    /// `None`: removed at `version` (tombstone). Shared: a request holds
    /// its route without copying it.
    target: Option<Arc<Target>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert: Option<Arc<CertPem>>,
    /// ACME HTTP-01: token → key authorization.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    challenges: Vec<(String, String)>,
}

/// A map hashed with foldhash: SipHash over the host was a visible part of
/// each request's lookup, and lookups insert nothing a client chooses.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default, Serialize, Deserialize)]
struct Table {
    version: u64,
    hosts: FastMap<String, Entry>,
    /// container id → upstream address and how many hosts name it (an
    /// instance's subdomain and its custom domains share a container), for
    /// the connector (rebuilt on load).
    #[serde(skip)]
    containers: FastMap<String, (String, usize)>,
}

impl Table {
    fn index(&mut self) {
        self.containers = FastMap::default();
        let targets: Vec<Arc<Target>> = self
            .hosts
            .values()
            .filter_map(|e| e.target.clone())
            .collect();
        for t in &targets {
            self.name_container(t);
        }
    }

    /// One more host routes to `t`'s container, at `t`'s address.
    fn name_container(&mut self, t: &Target) {
        if t.container_id.is_empty() {
            return;
        }
        let e = self
            .containers
            .entry(t.container_id.clone())
            .or_insert_with(|| (String::new(), 0));
        e.0.clone_from(&t.upstream);
        e.1 += 1;
    }

    /// One host fewer routes to `container_id`.
    fn forget_container(&mut self, container_id: &str) {
        if let Some(e) = self.containers.get_mut(container_id) {
            e.1 -= 1;
            if e.1 == 0 {
                self.containers.remove(container_id);
            }
        }
    }
}

pub struct RouteTable {
    table: RwLock<Table>,
    cache_file: Option<PathBuf>,
    dirty: tokio::sync::Notify,
    /// Bumped on every change, so spliced WebSockets can check their route.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Lower-cases, drops a port and a trailing dot: `Alice.Example.com.:443`
/// → `alice.example.com`. Returns `None` for anything that is not a host.
/// Borrows when the host is already lower-case (every request pays this).
pub fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.trim();
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    // One pass over the bytes (every request's host goes through here).
    let mut upper = false;
    for b in host.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' => {}
            b'A'..=b'Z' => upper = true,
            _ => return None,
        }
    }
    Some(if upper {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// The entry a route makes at `version`.
fn entry_of(r: Route, version: u64) -> Option<(String, Entry)> {
    let host = normalize_host(&r.hostname)?.into_owned();
    Some((
        host,
        Entry {
            version,
            cert: r.certificate.map(|c| {
                Arc::new(CertPem {
                    chain: c.chain_pem,
                    key: c.key_pem,
                })
            }),
            challenges: r
                .acme_challenges
                .into_iter()
                .map(|c| (c.token, c.key_authorization))
                .collect(),
            target: Some(Arc::new(Target {
                upstream: r.upstream,
                instance_id: r.instance_id,
                container_id: r.container_id,
                paused: r.paused,
                pool_key: Default::default(),
            })),
        },
    ))
}

impl RouteTable {
    /// A table loaded from `cache_file` when one exists.
    pub fn load(cache_file: Option<PathBuf>) -> Self {
        let mut table = cache_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Table>(&b).ok())
            .unwrap_or_default();
        table.index();
        if !table.hosts.is_empty() {
            tracing::info!(
                routes = table.hosts.len(),
                version = table.version,
                "serving cached routes until the scheduler answers"
            );
        }
        let t = Self {
            table: RwLock::new(table),
            cache_file,
            dirty: tokio::sync::Notify::new(),
            changes: tokio::sync::watch::Sender::new(0),
        };
        t.record_metrics();
        t
    }

    /// Where requests for `host` go. A hostname known only for its ACME
    /// challenge (no container) routes nothing.
    pub fn lookup(&self, host: &str) -> Option<Arc<Target>> {
        self.table
            .read()
            .unwrap()
            .hosts
            .get(host)
            .and_then(|e| e.target.as_ref())
            .filter(|t| !t.container_id.is_empty())
            .cloned()
    }

    /// The key authorization for ACME HTTP-01 `token` on `host`.
    pub fn challenge(&self, host: &str, token: &str) -> Option<String> {
        let t = self.table.read().unwrap();
        let e = t.hosts.get(host)?;
        e.target.as_ref()?;
        e.challenges
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, k)| k.clone())
    }

    /// The certificate of custom hostname `host`, with the version that set
    /// it (a new version is a renewed certificate).
    pub fn certificate(&self, host: &str) -> Option<(u64, Arc<CertPem>)> {
        let t = self.table.read().unwrap();
        let e = t.hosts.get(host)?;
        e.target.as_ref()?;
        e.cert.clone().map(|c| (e.version, c))
    }

    /// The address of `container_id`, when a route names it.
    pub fn upstream_of(&self, container_id: &str) -> Option<String> {
        self.table
            .read()
            .unwrap()
            .containers
            .get(container_id)
            .map(|(upstream, _)| upstream.clone())
    }

    /// Wakes on every change to the table.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn version(&self) -> u64 {
        self.table.read().unwrap().version
    }

    pub fn len(&self) -> usize {
        self.table
            .read()
            .unwrap()
            .hosts
            .values()
            .filter(|e| e.target.is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn apply_snapshot(&self, snap: RouteSnapshot) {
        let hosts = snap
            .routes
            .into_iter()
            .filter_map(|r| entry_of(r, snap.version))
            .collect();
        let mut table = Table {
            version: snap.version,
            hosts,
            containers: FastMap::default(),
        };
        table.index();
        *self.table.write().unwrap() = table;
        self.changed();
    }

    /// Applies a delta unless the host already has a newer version.
    pub fn apply_delta(&self, d: RouteDelta) {
        let (host, entry) = match d.upsert {
            Some(r) => match entry_of(r, d.version) {
                Some(found) => found,
                None => return,
            },
            None => match normalize_host(&d.removed_hostname) {
                Some(h) => (
                    h.into_owned(),
                    Entry {
                        version: d.version,
                        target: None,
                        cert: None,
                        challenges: Vec::new(),
                    },
                ),
                None => return,
            },
        };
        let target = entry.target.clone();
        {
            let mut t = self.table.write().unwrap();
            if t.hosts.get(&host).is_some_and(|e| e.version > d.version) {
                return;
            }
            t.version = t.version.max(d.version);
            if let Some(new) = &target {
                t.name_container(new);
            }
            if let Some(old) = t.hosts.insert(host, entry).and_then(|e| e.target) {
                t.forget_container(&old.container_id);
            }
        }
        self.changed();
    }

    fn record_metrics(&self) {
        metrics::gauge!("clawdeploy_edge_routes").set(self.len() as f64);
        metrics::gauge!("clawdeploy_edge_route_version").set(self.version() as f64);
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
        self.record_metrics();
        self.dirty.notify_one();
    }

    /// Writes the table to the cache file, whole or not at all (a
    /// temporary file, fsync, then rename).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.cache_file else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&*self.table.read().unwrap())?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the route cache needs a file name",
            )
        })?;
        clawdeploy_common::fs::write_private_atomically(dir, name, &bytes, None)
    }

    /// Saves the table as soon as it changes, then at most every 200 ms: a
    /// burst of deltas costs a few writes, not one per delta.
    pub async fn persist_changes(self: std::sync::Arc<Self>) {
        loop {
            self.dirty.notified().await;
            let table = self.clone();
            let saved = tokio::task::spawn_blocking(move || table.save()).await;
            if let Ok(Err(e)) = saved {
                tracing::warn!(error = %e, "route cache not written");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, up: &str) -> Route {
        Route {
            hostname: host.into(),
            upstream: up.into(),
            instance_id: "i".into(),
            container_id: "c".into(),
            ..Route::default()
        }
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(
            normalize_host("Alice.ClawDeploy.localhost:8000").as_deref(),
            Some("alice.clawdeploy.localhost")
        );
        assert_eq!(
            normalize_host("alice.clawdeploy.localhost.").as_deref(),
            Some("alice.clawdeploy.localhost")
        );
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn older_deltas_never_win_and_removals_stick() {
        let t = RouteTable::load(None);
        t.apply_snapshot(RouteSnapshot {
            version: 3,
            routes: vec![route("a.x.test", "10.0.0.1:1")],
        });
        t.apply_delta(RouteDelta {
            version: 5,
            upsert: None,
            removed_hostname: "a.x.test".into(),
            published_unix_ms: 0,
        });
        t.apply_delta(RouteDelta {
            version: 4,
            upsert: Some(route("a.x.test", "10.0.0.2:1")),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        assert_eq!(t.lookup("a.x.test"), None);
        t.apply_delta(RouteDelta {
            version: 6,
            upsert: Some(route("A.x.test", "10.0.0.3:1")),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        assert_eq!(t.lookup("a.x.test").unwrap().upstream, "10.0.0.3:1");
        assert_eq!(t.version(), 6);
    }

    #[test]
    fn a_paused_route_carries_its_reason_until_a_newer_one_resumes_it() {
        let t = RouteTable::load(None);
        let paused = Route {
            paused: "email_unverified".into(),
            ..route("p.x.test", "10.0.0.1:1")
        };
        t.apply_delta(RouteDelta {
            version: 1,
            upsert: Some(paused),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        assert_eq!(t.lookup("p.x.test").unwrap().paused, "email_unverified");
        t.apply_delta(RouteDelta {
            version: 2,
            upsert: Some(route("p.x.test", "10.0.0.9:1")),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        let resumed = t.lookup("p.x.test").unwrap();
        assert_eq!(
            (resumed.paused.as_str(), resumed.upstream.as_str()),
            ("", "10.0.0.9:1")
        );
    }

    #[test]
    fn a_replaced_container_is_no_longer_reachable_by_its_id() {
        let t = RouteTable::load(None);
        let mut a = route("a.x.test", "10.0.0.1:1");
        a.container_id = "ca".into();
        t.apply_snapshot(RouteSnapshot {
            version: 1,
            routes: vec![a],
        });
        assert_eq!(t.upstream_of("ca").as_deref(), Some("10.0.0.1:1"));
        let mut b = route("a.x.test", "10.0.0.1:1");
        b.container_id = "cb".into();
        t.apply_delta(RouteDelta {
            version: 2,
            upsert: Some(b),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        // Same address, new container: the old id resolves to nothing.
        assert_eq!(t.upstream_of("ca"), None);
        assert_eq!(t.upstream_of("cb").as_deref(), Some("10.0.0.1:1"));
        t.apply_delta(RouteDelta {
            version: 3,
            upsert: None,
            removed_hostname: "a.x.test".into(),
            published_unix_ms: 0,
        });
        assert_eq!(t.upstream_of("cb"), None);
        assert_eq!(t.lookup("a.x.test"), None);
    }

    #[tokio::test]
    async fn cache_is_written_after_changes_and_survives_restart() {
        let path = std::env::temp_dir().join(format!("cd-edge-cache-{}.json", std::process::id()));
        let t = std::sync::Arc::new(RouteTable::load(Some(path.clone())));
        tokio::spawn(t.clone().persist_changes());
        for v in 1..=50 {
            t.apply_delta(RouteDelta {
                version: v,
                upsert: Some(route(&format!("h{v}.x.test"), "10.0.0.9:1")),
                removed_hostname: String::new(),
                published_unix_ms: 0,
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let again = RouteTable::load(Some(path.clone()));
            if again.len() == 50 {
                assert_eq!(again.lookup("h50.x.test").unwrap().upstream, "10.0.0.9:1");
                assert_eq!(again.version(), 50);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cache never caught up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        std::fs::remove_file(path).ok();
    }
}
