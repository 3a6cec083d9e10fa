//! What the edge tests speak to the edge with: a public CA that issues the
//! edge's wildcard certificate (and re-issues it, to test reloads), and a
//! raw HTTP client over TCP or TLS that reports what was negotiated (ALPN,
//! the certificate served) and can hold one connection across requests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// A CA for the edge's public certificate, kept in `dir`.
pub struct PublicPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl PublicPki {
    /// A new CA; writes `ca.crt.pem` into `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "ClawDeploy test public CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        std::fs::write(dir.join("ca.crt.pem"), cert.pem())?;
        std::fs::write(dir.join("ca.key.pem"), key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA kept in `dir` by `create`.
    pub fn open(dir: &Path) -> Result<Self> {
        let cert = std::fs::read_to_string(dir.join("ca.crt.pem"))?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key.pem"))?)?;
        Ok(Self {
            dir: dir.to_owned(),
            issuer: Issuer::from_ca_cert_pem(&cert, key)?,
        })
    }

    /// Issues `*.<domain>` (and `<domain>`) into `edge.crt.pem` and
    /// `edge.key.pem`, written to temporary names and renamed, as a
    /// certificate manager does. `tag` lands in the subject, so tests can
    /// tell issues apart.
    pub fn issue_wildcard(&self, domain: &str, tag: u32) -> Result<Vec<u8>> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("edge certificate #{tag}"));
        params.subject_alt_names = vec![
            SanType::DnsName(format!("*.{domain}").try_into()?),
            SanType::DnsName(domain.to_owned().try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let write = |name: &str, body: &str| -> Result<()> {
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, self.dir.join(name))?;
            Ok(())
        };
        write("edge.key.pem", &key.serialize_pem())?;
        write("edge.crt.pem", &cert.pem())?;
        Ok(cert.der().to_vec())
    }
}

/// A TLS client that trusts only `ca_pem` and offers `alpn`.
pub fn tls_connector(ca_pem: &Path, alpn: &[&str]) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// An empty or whole request body.
pub fn body(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// One client connection to the edge.
pub struct EdgeConn {
    sender: Sender,
    /// The protocol ALPN settled on (TLS only).
    pub alpn: Option<Vec<u8>>,
    /// The certificate the edge presented (TLS only).
    pub peer_cert: Option<Vec<u8>>,
}

impl EdgeConn {
    /// Plain HTTP/1.1.
    pub async fn plain(addr: std::net::SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        Self::handshake(TokioIo::new(tcp), false, None, None).await
    }

    /// Plain HTTP/2 (prior knowledge, "h2c").
    pub async fn plain_h2(addr: std::net::SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        Self::handshake(TokioIo::new(tcp), true, None, None).await
    }

    /// TLS to `addr` with SNI `host`, trusting only `ca_pem`, offering `alpn`.
    /// Speaks HTTP/2 when the edge picks `h2`.
    pub async fn tls(
        addr: std::net::SocketAddr,
        host: &str,
        ca_pem: &Path,
        alpn: &[&str],
    ) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        Self::tls_over(tcp, host, ca_pem, alpn).await
    }

    /// As a load balancer at `from` would connect: `header` (a PROXY
    /// protocol header) first, then TLS with SNI `host` trusting `ca_pem`
    /// when given, else plain HTTP/1.1.
    pub async fn via_balancer(
        addr: std::net::SocketAddr,
        from: std::net::IpAddr,
        header: &[u8],
        tls: Option<(&str, &Path)>,
    ) -> Result<Self> {
        let tcp = Self::from_address(addr, from, header).await?;
        match tls {
            Some((host, ca)) => Self::tls_over(tcp, host, ca, &["http/1.1"]).await,
            None => Self::handshake(TokioIo::new(tcp), false, None, None).await,
        }
    }

    /// A TCP connection to `addr` from the local address `from`, having
    /// sent `first`.
    pub async fn from_address(
        addr: std::net::SocketAddr,
        from: std::net::IpAddr,
        first: &[u8],
    ) -> Result<TcpStream> {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(from, 0))?;
        let mut tcp = socket.connect(addr).await?;
        tcp.write_all(first).await?;
        Ok(tcp)
    }

    async fn tls_over(tcp: TcpStream, host: &str, ca_pem: &Path, alpn: &[&str]) -> Result<Self> {
        let tls = tls_connector(ca_pem, alpn)?
            .connect(ServerName::try_from(host.to_owned())?, tcp)
            .await
            .context("TLS handshake with the edge")?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let peer_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        let h2 = alpn.as_deref() == Some(b"h2");
        Self::handshake(TokioIo::new(tls), h2, alpn, peer_cert).await
    }

    async fn handshake<I>(
        io: TokioIo<I>,
        h2: bool,
        alpn: Option<Vec<u8>>,
        peer_cert: Option<Vec<u8>>,
    ) -> Result<Self>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let sender = if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(s)
        };
        Ok(Self {
            sender,
            alpn,
            peer_cert,
        })
    }

    pub async fn send(&mut self, req: Request<ReqBody>) -> Result<Response<Incoming>> {
        Ok(match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        })
    }

    /// GET `path` at `host` (as `Host` on HTTP/1.1, `:authority` on HTTP/2);
    /// returns the status and the whole body.
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        let h2 = matches!(self.sender, Sender::H2(_));
        let scheme = if self.alpn.is_some() { "https" } else { "http" };
        let mut b = Request::get(if h2 {
            format!("{scheme}://{host}{path}")
        } else {
            path.to_owned()
        });
        if !h2 {
            b = b.header("host", host);
        }
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let resp = self.send(b.body(body(Bytes::new()))?).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
