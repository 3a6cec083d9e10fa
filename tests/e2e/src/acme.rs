//! Let's Encrypt's test CA on loopback: Debian's `pebble` (ACME) with
//! `pebble-challtestsrv` as its DNS server, whose management API sets the
//! records a customer would create. Pebble's own HTTPS listener gets a
//! certificate from a throwaway CA made here; the root that signs what
//! pebble issues is fetched from its management API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;

use crate::edge_client::EdgeConn;
use crate::free_addr;

pub struct Pebble {
    pebble: Child,
    challtestsrv: Child,
    /// The ACME directory (HTTPS).
    pub directory_url: String,
    /// The CA that signs pebble's own HTTPS certificate (for the ACME client).
    pub tls_ca: PathBuf,
    /// challtestsrv's DNS server (UDP and TCP).
    pub dns: SocketAddr,
    /// challtestsrv's management API base URL.
    pub management: String,
    pebble_management: SocketAddr,
    client: reqwest::Client,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A throwaway CA and a `localhost`/127.0.0.1 certificate for pebble's
/// listeners, in `dir`: `ca.pem`, `cert.pem`, `key.pem`.
fn pebble_tls(dir: &Path) -> Result<()> {
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "pebble listener test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(())
}

/// Where pebble and its DNS server listen.
#[derive(Clone, Copy, Debug)]
pub struct PebbleAddrs {
    /// The ACME directory's HTTPS listener.
    pub acme: SocketAddr,
    /// Pebble's management API (its issuing roots).
    pub acme_management: SocketAddr,
    pub dns: SocketAddr,
    pub dns_management: SocketAddr,
}

impl PebbleAddrs {
    /// Free ports on loopback (each test its own).
    pub fn free() -> Self {
        Self {
            acme: free_addr(),
            acme_management: free_addr(),
            dns: free_addr(),
            dns_management: free_addr(),
        }
    }
}

impl Pebble {
    /// Starts both servers on free ports; see `start_at`.
    pub async fn start(dir: &Path, http_port: u16, validity_secs: u64) -> Result<Self> {
        Self::start_at(dir, PebbleAddrs::free(), http_port, validity_secs).await
    }

    /// Starts both servers at `addrs`, with their files in `dir`. Pebble
    /// validates HTTP-01 on `http_port` (the edge's plain listener) and
    /// issues certificates valid for `validity_secs`.
    pub async fn start_at(
        dir: &Path,
        addrs: PebbleAddrs,
        http_port: u16,
        validity_secs: u64,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        pebble_tls(dir)?;
        let (listen, management, dns, chall_mgmt, tls_port) = (
            addrs.acme,
            addrs.acme_management,
            addrs.dns,
            addrs.dns_management,
            free_addr(),
        );
        let config = json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port.port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_secs,
        }});
        std::fs::write(dir.join("pebble.json"), serde_json::to_vec_pretty(&config)?)?;
        let log = |name: &str| -> Result<Stdio> {
            Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
        };
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-dns01", &dns.to_string()])
            .args(["-management", &chall_mgmt.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            // Names without records of their own resolve to the edge on
            // loopback; no AAAA, so the CA dials IPv4.
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv")?)
            .stderr(log("challtestsrv")?)
            .spawn()
            .context("pebble-challtestsrv (Debian's pebble; scripts/test installs it)")?;
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &dns.to_string()])
            // No random validation delays, no injected bad nonces, and a
            // fresh authorization per order (renewals validate again).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble")?)
            .stderr(log("pebble")?)
            .spawn()
            .context("pebble (Debian's pebble; scripts/test installs it)")?;
        let p = Pebble {
            pebble,
            challtestsrv,
            directory_url: format!("https://{listen}/dir"),
            tls_ca: dir.join("ca.pem"),
            dns,
            management: format!("http://{chall_mgmt}"),
            pebble_management: management,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let dns_up = p.clear_txt("warmup.example").await.is_ok();
            if dns_up && tokio::net::TcpStream::connect(listen).await.is_ok() {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "pebble did not come up; see {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(p)
    }

    async fn manage(&self, what: &str, body: serde_json::Value) -> Result<()> {
        let r = self
            .client
            .post(format!("{}/{what}", self.management))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "challtestsrv {what}: {}",
            r.status()
        );
        Ok(())
    }

    pub async fn set_txt(&self, name: &str, value: &str) -> Result<()> {
        self.manage(
            "set-txt",
            json!({"host": format!("{name}."), "value": value}),
        )
        .await
    }

    pub async fn clear_txt(&self, name: &str) -> Result<()> {
        self.manage("clear-txt", json!({"host": format!("{name}.")}))
            .await
    }

    pub async fn set_cname(&self, name: &str, target: &str) -> Result<()> {
        self.manage(
            "set-cname",
            json!({"host": format!("{name}."), "target": format!("{target}.")}),
        )
        .await
    }

    pub async fn add_a(&self, name: &str, ip: &str) -> Result<()> {
        self.manage(
            "add-a",
            json!({"host": format!("{name}."), "addresses": [ip]}),
        )
        .await
    }

    pub async fn clear_a(&self, name: &str) -> Result<()> {
        self.manage("clear-a", json!({"host": format!("{name}.")}))
            .await
    }

    /// The root pebble signs certificates with (PEM), from its management
    /// API; written to `to`.
    pub async fn issuing_root(&self, to: &Path) -> Result<()> {
        let mut conn = EdgeConn::tls(
            self.pebble_management,
            "localhost",
            &self.tls_ca,
            &["http/1.1"],
        )
        .await?;
        let (status, pem) = conn.get("localhost", "/roots/0", None).await?;
        anyhow::ensure!(status == 200, "pebble /roots/0 answered {status}");
        std::fs::write(to, pem)?;
        Ok(())
    }

    /// The scheduler flags that point it at this CA and DNS server.
    pub fn scheduler_args(&self) -> Vec<String> {
        vec![
            "--acme-directory-url".into(),
            self.directory_url.clone(),
            "--acme-ca-bundle".into(),
            self.tls_ca.display().to_string(),
            "--dns-nameservers".into(),
            self.dns.to_string(),
        ]
    }
}
