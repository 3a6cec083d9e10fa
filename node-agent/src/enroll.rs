//! The node's certificate: joining with a one-time token (after checking the
//! scheduler's CA against the operator's pin), renewing before expiry over
//! the live connection, and keeping the key and certificate files consistent
//! across crashes. The private key is generated here and never leaves the
//! node.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::node_enrollment_client::NodeEnrollmentClient;
use clawdeploy_proto::{JoinRequest, NodeCertificate, RenewRequest};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use crate::error::{Error, Result};
use clawdeploy_common::fs::write_private_atomically;

/// Where a node keeps its TLS material: `ca.crt.pem`, `<node>.crt.pem`,
/// `<node>.key.pem`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub dir: PathBuf,
    pub node_id: String,
}

impl TlsFiles {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.crt.pem", self.node_id))
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join(format!("{}.key.pem", self.node_id))
    }
    fn next(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".next");
        PathBuf::from(p)
    }

    /// Replaces key and certificate. Both are written as `.next` files
    /// first, then the key is renamed, then the certificate; a crash in
    /// between is finished by `finish_rotation` at the next start.
    fn install(&self, key_pem: &str, cert: &NodeCertificate) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let name = |p: PathBuf| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        write_private_atomically(&self.dir, "ca.crt.pem", cert.ca_pem.as_bytes(), None)?;
        write_private_atomically(
            &self.dir,
            &name(Self::next(&self.key())),
            key_pem.as_bytes(),
            None,
        )?;
        write_private_atomically(
            &self.dir,
            &name(Self::next(&self.cert())),
            cert.cert_pem.as_bytes(),
            None,
        )?;
        std::fs::rename(Self::next(&self.key()), self.key())?;
        std::fs::rename(Self::next(&self.cert()), self.cert())?;
        Ok(())
    }

    /// Completes or discards a rotation a crash interrupted, so the key and
    /// certificate on disk always belong together.
    pub fn finish_rotation(&self) -> Result<()> {
        let (key_next, cert_next) = (Self::next(&self.key()), Self::next(&self.cert()));
        match (key_next.exists(), cert_next.exists()) {
            // The key moved already: the certificate must follow.
            (false, true) => std::fs::rename(&cert_next, self.cert())?,
            // Nothing moved yet: the old pair is still whole.
            (true, _) => {
                std::fs::remove_file(&key_next)?;
                if cert_next.exists() {
                    std::fs::remove_file(&cert_next)?;
                }
            }
            (false, false) => {}
        }
        Ok(())
    }
}

/// A fresh key and a CSR for it. The CA ignores the CSR's names.
fn key_and_csr() -> Result<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Tls(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// `sha256:<hex>` of a DER certificate.
pub fn pin_of(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// Accepts the scheduler only if its chain contains a CA whose hash is the
/// pin, and the leaf verifies under that CA for the expected name. Records
/// the CA it found.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pin_of(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("the scheduler's CA does not match the pin".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let others: Vec<_> = intermediates.iter().filter(|c| *c != ca).cloned().collect();
        verifier.verify_server_cert(end_entity, &others, server_name, ocsp, now)?;
        *self.found.lock().unwrap() = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Opens one TLS connection to the scheduler and returns its CA (PEM), but
/// only if that CA's hash is `pin` and the server's certificate verifies
/// under it. Nothing is sent over the connection.
/// Tries each scheduler address in turn.
pub async fn fetch_pinned_ca(scheduler: &SchedulerEndpoint, pin: &str) -> Result<String> {
    let mut last = Error::Tls("no scheduler address configured".into());
    for url in &scheduler.urls {
        match fetch_pinned_ca_from(url, scheduler, pin).await {
            Ok(ca) => return Ok(ca),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn fetch_pinned_ca_from(
    url: &str,
    scheduler: &SchedulerEndpoint,
    pin: &str,
) -> Result<String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::Tls(format!("scheduler url: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| Error::Tls("scheduler url has no host".into()))?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(443)
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: pin.trim().to_ascii_lowercase(),
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(scheduler.server_name.clone())
        .map_err(|e| Error::Tls(format!("scheduler name: {e}")))?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| Error::Tls(format!("TLS handshake with {addr} timed out")))?
        .map_err(|e| Error::Tls(format!("scheduler at {addr} refused: {e}")))?;
    let der = verifier
        .found
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| Error::Tls("no pinned CA seen".into()))?;
    Ok(pem_of(&der))
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Whether a join failure is final (bad token, wrong pin, removed node) or
/// worth retrying (scheduler not up yet).
pub fn is_final(e: &Error) -> bool {
    match e {
        Error::Rpc(s) => matches!(
            s.code(),
            tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
        ),
        Error::Tls(m) => m.contains("pin"),
        _ => false,
    }
}

/// Joins the cluster: checks the CA against `pin`, then trades the token
/// and a CSR for this node's first certificate, and installs it.
pub async fn join(
    scheduler: &SchedulerEndpoint,
    files: &TlsFiles,
    token: &str,
    pin: &str,
) -> Result<()> {
    let ca_pem = fetch_pinned_ca(scheduler, pin).await?;
    std::fs::create_dir_all(&files.dir)?;
    write_private_atomically(&files.dir, "ca.crt.pem", ca_pem.as_bytes(), None)?;
    let channel = scheduler
        .connect_anonymous()
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    let (key_pem, csr_der) = key_and_csr()?;
    let cert = NodeEnrollmentClient::new(channel)
        .join(JoinRequest {
            token: token.trim().to_owned(),
            node_id: files.node_id.clone(),
            csr_der,
        })
        .await?
        .into_inner();
    if pin_of(&der_of(&cert.ca_pem)?) != pin.trim().to_ascii_lowercase() {
        return Err(Error::Tls(
            "the CA the scheduler returned does not match the pin".into(),
        ));
    }
    files.install(&key_pem, &cert)?;
    tracing::info!(
        node_id = files.node_id,
        not_after = cert.not_after_unix,
        "joined; certificate installed"
    );
    Ok(())
}

/// Renews this node's certificate over an existing (mTLS) channel and
/// installs the new pair; the channel keeps working on its TLS session.
pub async fn renew(channel: tonic::transport::Channel, files: &TlsFiles) -> Result<i64> {
    let (key_pem, csr_der) = key_and_csr()?;
    let cert = NodeEnrollmentClient::new(channel)
        .renew(RenewRequest { csr_der })
        .await?
        .into_inner();
    files.install(&key_pem, &cert)?;
    metrics::counter!("clawdeploy_agent_cert_renewals_total").increment(1);
    metrics::gauge!("clawdeploy_agent_cert_not_after_seconds").set(cert.not_after_unix as f64);
    tracing::info!(not_after = cert.not_after_unix, "certificate renewed");
    Ok(cert.not_after_unix)
}

fn der_of(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| Error::Tls(format!("certificate PEM: {e}")))
}

/// The certificate's `not_before` and `not_after`, in Unix seconds.
pub fn validity(path: &Path) -> Result<(i64, i64)> {
    let der = der_of(&std::fs::read_to_string(path)?)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::Tls(format!("certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_rotation_leaves_a_matching_pair() {
        let dir = std::env::temp_dir().join(format!("cd-rot-{}", std::process::id()));
        let files = TlsFiles {
            dir: dir.clone(),
            node_id: "n1".into(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(files.key(), "old-key").unwrap();
        std::fs::write(files.cert(), "old-cert").unwrap();
        // Crash after the key moved: the new certificate follows it.
        std::fs::write(files.key(), "new-key").unwrap();
        std::fs::write(TlsFiles::next(&files.cert()), "new-cert").unwrap();
        files.finish_rotation().unwrap();
        assert_eq!(std::fs::read_to_string(files.cert()).unwrap(), "new-cert");
        // Crash before anything moved: the old pair stays.
        std::fs::write(TlsFiles::next(&files.key()), "newer-key").unwrap();
        std::fs::write(TlsFiles::next(&files.cert()), "newer-cert").unwrap();
        files.finish_rotation().unwrap();
        assert_eq!(std::fs::read_to_string(files.key()).unwrap(), "new-key");
        assert_eq!(std::fs::read_to_string(files.cert()).unwrap(), "new-cert");
        assert!(!TlsFiles::next(&files.cert()).exists());
        std::fs::remove_dir_all(dir).ok();
    }
}
