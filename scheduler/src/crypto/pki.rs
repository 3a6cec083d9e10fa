//! The scheduler's own certificate authority (rcgen) and the identities it
//! vouches for. Every agent and edge certificate names exactly one identity
//! in a `spiffe://clawdeploy/...` URI SAN; the scheduler authorises callers
//! by that name only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::error::{Error, Result};

const SPIFFE_PREFIX: &str = "spiffe://clawdeploy/";

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Node(String),
    Edge(String),
    Scheduler,
}

impl Identity {
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{SPIFFE_PREFIX}node/{id}"),
            Identity::Edge(id) => format!("{SPIFFE_PREFIX}edge/{id}"),
            Identity::Scheduler => format!("{SPIFFE_PREFIX}scheduler"),
        }
    }

    pub fn parse_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
        match rest.split_once('/') {
            Some(("node", id)) if valid_id(id) => Some(Identity::Node(id.to_owned())),
            Some(("edge", id)) if valid_id(id) => Some(Identity::Edge(id.to_owned())),
            None if rest == "scheduler" => Some(Identity::Scheduler),
            _ => None,
        }
    }

    /// The single clawdeploy identity named by a DER certificate's SANs.
    /// Several, or none, is no identity at all.
    pub fn from_cert_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut found = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Identity::parse_uri(uri),
                _ => None,
            });
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// Node and edge ids: short, DNS-label-like, safe in paths and labels.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM encoded.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// Loads `ca.crt.pem`/`ca.key.pem` from `dir`, creating them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let (cert_path, key_path) = (dir.join("ca.crt.pem"), dir.join("ca.key.pem"));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(Error::internal)?;
            let key =
                KeyPair::from_pem(&std::fs::read_to_string(&key_path).map_err(Error::internal)?)
                    .map_err(Error::internal)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(Error::internal)?;
            return Ok(Self { cert_pem, issuer });
        }
        std::fs::create_dir_all(dir).map_err(Error::internal)?;
        let key = KeyPair::generate().map_err(Error::internal)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("ClawDeploy CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(Error::internal)?;
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem()).map_err(Error::internal)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`, usable as TLS client and server,
    /// with extra DNS/IP names for servers. The key is generated here.
    pub fn issue(
        &self,
        identity: &Identity,
        extra_names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate().map_err(Error::internal)?;
        let (params, _) = leaf_params(identity, extra_names, lifetime)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(Error::internal)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate signing request (PKCS#10, DER) for
    /// `identity`. The request proves possession of its key; everything
    /// else in it (names, usages) is ignored: the CA decides what the
    /// certificate says.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<SignedCert> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| Error::BadRequest(format!("certificate signing request: {e}")))?;
        let (params, serial) = leaf_params(identity, &[], lifetime)?;
        let not_after = params.not_after.unix_timestamp();
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(Error::internal)?;
        Ok(SignedCert {
            cert_pem: cert.pem(),
            serial: hex::encode(serial),
            not_after_unix: not_after,
        })
    }

    /// `sha256:<hex>` of the CA certificate (DER): what a joining node pins.
    pub fn pin(&self) -> String {
        ca_pin(&self.cert_pem)
    }

    /// Writes `<name>.crt.pem`, `<name>.key.pem` (mode 0600) and `ca.crt.pem`
    /// into `dir`: everything a process needs for mTLS.
    pub fn write_bundle(
        &self,
        dir: &Path,
        file_name: &str,
        issued: &IssuedCert,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(Error::internal)?;
        std::fs::write(dir.join(format!("{file_name}.crt.pem")), &issued.cert_pem)
            .map_err(Error::internal)?;
        write_private(&dir.join(format!("{file_name}.key.pem")), &issued.key_pem)?;
        let ca_path = dir.join("ca.crt.pem");
        if std::fs::read_to_string(&ca_path).ok().as_deref() != Some(self.cert_pem.as_str()) {
            std::fs::write(&ca_path, &self.cert_pem).map_err(Error::internal)?;
        }
        Ok(dir.to_path_buf())
    }
}

/// The pin of a PEM CA certificate: `sha256:` and the hex digest of its DER.
pub fn ca_pin(ca_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// A certificate signed for a key the CA never saw.
pub struct SignedCert {
    pub cert_pem: String,
    pub serial: String,
    pub not_after_unix: i64,
}

/// What every leaf certificate says: exactly one identity URI, optional
/// server names, client and server usage, a random serial. `not_before` is
/// back-dated a little for clock skew, never more than a quarter of the
/// lifetime, so short test lifetimes still renew on schedule.
fn leaf_params(
    identity: &Identity,
    extra_names: &[String],
    lifetime: Duration,
) -> Result<(CertificateParams, [u8; 16])> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&identity.uri());
    params.subject_alt_names.push(SanType::URI(
        identity.uri().try_into().map_err(Error::internal)?,
    ));
    for n in extra_names {
        params.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into().map_err(Error::internal)?),
        });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    let skew = (lifetime / 4).min(Duration::from_secs(300));
    params.not_before = now - time::Duration::try_from(skew).map_err(Error::internal)?;
    params.not_after = now + time::Duration::try_from(lifetime).map_err(Error::internal)?;
    Ok((params, serial))
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "ClawDeploy");
    dn
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::internal)?;
    f.write_all(contents.as_bytes()).map_err(Error::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_names_exactly_its_identity() {
        let dir = std::env::temp_dir().join(format!("cd-pki-{}", crate::crypto::random_token(6)));
        let ca = Ca::load_or_create(&dir).unwrap();
        let issued = ca
            .issue(
                &Identity::Node("node-a".into()),
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert_eq!(
            Identity::from_cert_der(&der),
            Some(Identity::Node("node-a".into()))
        );
        // Reloading the CA from disk keeps the same root.
        let again = Ca::load_or_create(&dir).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn identity_uris_parse_strictly() {
        assert_eq!(
            Identity::parse_uri("spiffe://clawdeploy/edge/e1"),
            Some(Identity::Edge("e1".into()))
        );
        assert_eq!(
            Identity::parse_uri("spiffe://clawdeploy/scheduler"),
            Some(Identity::Scheduler)
        );
        assert_eq!(Identity::parse_uri("spiffe://clawdeploy/node/../x"), None);
        assert_eq!(Identity::parse_uri("spiffe://other/node/a"), None);
        assert_eq!(Identity::parse_uri("spiffe://clawdeploy/node/"), None);
    }
}
