//! Public TLS: certificate and key pairs from files (a wildcard for
//! `*.<base_domain>`, and any others), chosen per handshake by SNI, and
//! reloaded when the files change; and customers' own hostnames'
//! certificates, which arrive with their routes and are picked first by
//! exact SNI. A reload or a renewed route swaps what new handshakes get;
//! connections already up keep the certificate they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::routes::RouteTable;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// One loaded pair: the names its certificate covers, and what rustls signs with.
struct Loaded {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// Identifies a file's content cheaply: size and modification time.
type Stamp = Option<(u64, SystemTime)>;

pub struct CertStore {
    files: Vec<CertFiles>,
    loaded: RwLock<Arc<Vec<Loaded>>>,
    stamps: Mutex<Vec<(Stamp, Stamp)>>,
    /// Custom hostnames' certificates come from here.
    routes: Option<Arc<RouteTable>>,
    /// Parsed custom certificates: host → (route version, key). Parsed on
    /// the first handshake after a route change, then reused.
    custom: RwLock<HashMap<String, (u64, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish()
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// Loads one pair from files and checks that the key belongs to the
/// certificate.
fn load_pair(files: &CertFiles) -> Result<Loaded, TlsError> {
    let (cert_pem, key_pem) = (read(&files.cert)?, read(&files.key)?);
    let (loaded, not_after) = parse_pair(&cert_pem, &key_pem)
        .map_err(|(in_key, what)| invalid(if in_key { &files.key } else { &files.cert }, what))?;
    metrics::gauge!("clawdeploy_edge_tls_cert_not_after_seconds", "name" => loaded.names[0].clone())
        .set(not_after as f64);
    Ok(loaded)
}

/// A PEM chain and key as rustls signs with them, the names the leaf
/// covers and its expiry (Unix seconds). Errors say whether the key
/// (`true`) or the certificate is at fault.
fn parse_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<(Loaded, i64), (bool, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| (false, e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| (false, "no certificate in the file".to_owned()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| (true, e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| (true, e.to_string()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| (false, e.to_string()))?;
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.dedup();
    if names.is_empty() {
        return Err((false, "the certificate names no DNS host".into()));
    }
    let not_after = parsed.validity().not_after.timestamp();
    let key = CertifiedKey::new(chain, signer);
    // A half-replaced pair (new certificate, old key) must not go live.
    key.keys_match().map_err(|e| (true, e.to_string()))?;
    Ok((
        Loaded {
            names,
            key: Arc::new(key),
        },
        not_after,
    ))
}

/// Whether certificate name `pattern` covers `host` (RFC 6125: a wildcard
/// stands for exactly one leftmost label).
fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

impl CertStore {
    /// Loads every pair; fails when any of them is unusable. Custom
    /// hostnames' certificates come from `routes`.
    pub fn load(
        files: Vec<CertFiles>,
        routes: Option<Arc<RouteTable>>,
    ) -> Result<Arc<Self>, TlsError> {
        let stamps = files
            .iter()
            .map(|f| (stamp(&f.cert), stamp(&f.key)))
            .collect();
        let loaded = files.iter().map(load_pair).collect::<Result<Vec<_>, _>>()?;
        if loaded.is_empty() {
            return Err(TlsError::Invalid {
                path: PathBuf::new(),
                what: "no certificate configured".into(),
            });
        }
        Ok(Arc::new(Self {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
            stamps: Mutex::new(stamps),
            routes,
            custom: RwLock::new(HashMap::new()),
        }))
    }

    /// The rustls server configuration: this store picks the certificate,
    /// ALPN offers HTTP/2 then HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Reloads when any file changed since the last look. A pair that fails
    /// to load (half-written, mismatched) leaves the old one serving; the
    /// next change tries again.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now: Vec<(Stamp, Stamp)> = self
            .files
            .iter()
            .map(|f| (stamp(&f.cert), stamp(&f.key)))
            .collect();
        {
            let mut last = self.stamps.lock().unwrap();
            if *last == now {
                return None;
            }
            *last = now;
        }
        let result = self
            .files
            .iter()
            .map(load_pair)
            .collect::<Result<Vec<_>, _>>()
            .map(|loaded| *self.loaded.write().unwrap() = Arc::new(loaded));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("clawdeploy_edge_tls_reloads_total", "result" => outcome).increment(1);
        Some(result)
    }

    /// Polls the files every `every` and reloads on change.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload_if_changed() {
                Some(Ok(())) => tracing::info!("TLS certificates reloaded"),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "TLS certificates not reloaded; serving the previous ones")
                }
                None => {}
            }
        }
    }
}

impl CertStore {
    /// The certificate a custom hostname's route carries, parsed once per
    /// route version. Never issued here: only what the scheduler sent.
    fn custom_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let (version, pem) = self.routes.as_ref()?.certificate(sni)?;
        if let Some((v, key)) = self.custom.read().unwrap().get(sni) {
            if *v == version {
                return Some(key.clone());
            }
        }
        match parse_pair(pem.chain.as_bytes(), pem.key.as_bytes()) {
            Ok((loaded, _)) => {
                let mut custom = self.custom.write().unwrap();
                // Hosts whose routes went away leave the cache with them.
                if custom.len() > 64 {
                    let routes = self.routes.as_ref()?;
                    custom.retain(|h, _| routes.certificate(h).is_some());
                }
                custom.insert(sni.to_owned(), (version, loaded.key.clone()));
                Some(loaded.key)
            }
            Err((_, what)) => {
                metrics::counter!("clawdeploy_edge_tls_reloads_total", "result" => "error")
                    .increment(1);
                tracing::warn!(
                    host = sni,
                    error = what,
                    "a custom domain's certificate is unusable"
                );
                None
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = hello
            .server_name()
            .and_then(|sni| self.custom_cert(&sni.to_ascii_lowercase()))
        {
            return Some(key);
        }
        let loaded = self.loaded.read().unwrap().clone();
        let by_name = hello.server_name().and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            loaded
                .iter()
                .find(|l| l.names.iter().any(|n| covers(n, &sni)))
        });
        // No SNI, or a name nobody covers: the first pair (the client then
        // decides; the edge answers 404 for unknown hosts anyway).
        by_name.or(loaded.first()).map(|l| l.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(covers("*.clawdeploy.com", "alice.clawdeploy.com"));
        assert!(!covers("*.clawdeploy.com", "clawdeploy.com"));
        assert!(!covers("*.clawdeploy.com", "a.b.clawdeploy.com"));
        assert!(!covers("*.clawdeploy.com", ".clawdeploy.com"));
        assert!(covers("clawdeploy.com", "clawdeploy.com"));
        assert!(!covers("clawdeploy.com", "alice.clawdeploy.com"));
    }
}
