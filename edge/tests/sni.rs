//! SNI picks the certificate pair that covers the name a client asks for;
//! a name nobody covers (or none at all) gets the first pair. Real rustls
//! handshakes on loopback against the edge's certificate store.

use std::sync::Arc;

use clawdeploy_edge::tls::{CertFiles, CertStore};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

/// A self-signed certificate for `names`, written as a pair into `dir`.
fn pair(dir: &std::path::Path, stem: &str, names: &[&str]) -> (CertFiles, Vec<u8>) {
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let files = CertFiles {
        cert: dir.join(format!("{stem}.crt.pem")),
        key: dir.join(format!("{stem}.key.pem")),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (files, cert.der().to_vec())
}

/// Accepts nothing but certificates: the test only looks at what is served.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate the server presents to a client asking for `sni`.
async fn served(addr: std::net::SocketAddr, sni: ServerName<'static>) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(sni, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn sni_picks_the_pair_that_covers_the_name() {
    let dir = std::env::temp_dir().join(format!("cd-edge-sni-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (one, one_der) = pair(&dir, "one", &["*.one.test", "one.test"]);
    let (two, two_der) = pair(&dir, "two", &["*.two.test"]);
    let store = CertStore::load(vec![one, two], None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();
    assert_eq!(served(addr, name("alice.two.test")).await, two_der);
    assert_eq!(served(addr, name("ALICE.One.Test")).await, one_der);
    assert_eq!(served(addr, name("one.test")).await, one_der);
    // Not covered (a wildcard is one label deep), and no SNI at all.
    assert_eq!(served(addr, name("a.b.two.test")).await, one_der);
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    assert_eq!(served(addr, ip).await, one_der);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let dir = std::env::temp_dir().join(format!("cd-edge-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (one, _) = pair(&dir, "one", &["*.one.test"]);
    let (two, _) = pair(&dir, "two", &["*.two.test"]);
    let mixed = CertFiles {
        cert: one.cert,
        key: two.key,
    };
    let err = CertStore::load(vec![mixed], None).unwrap_err();
    assert!(err.to_string().contains("two.key.pem"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}
