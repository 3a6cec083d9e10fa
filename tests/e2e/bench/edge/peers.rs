//! The proxies the edge is measured against, run by this benchmark: nginx
//! and Caddy configured for the same tenant and certificate.

use super::*;

pub(crate) const PROXIES: [&str; 3] = ["edge", "nginx", "caddy"];

pub(crate) struct Peer {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) child: Option<Child>,
}

impl Drop for Peer {
    /// SIGTERM first, so nginx's master stops its workers (a SIGKILLed
    /// master leaves them running, and serving, behind it); SIGKILL if the
    /// process is still there after a few seconds.
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn nginx(dir: &Path, upstream: &str, tls: &Path, pin: bool) -> Result<Peer> {
    let addr = free_addr();
    let conf = format!(
        r#"worker_processes 2;
{affinity}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  # nginx closes a connection after 1000 requests by default (HTTP/2
  # included), which h2load does not reopen: lift it, as for a proxy.
  keepalive_requests 1000000;
  upstream tenant {{ server {upstream}; keepalive 64; }}
  server {{
    listen {addr} ssl http2;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://tenant;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
"#,
        dir = dir.display(),
        crt = tls.join("edge.crt.pem").display(),
        key = tls.join("edge.key.pem").display(),
        affinity = if pin { "worker_cpu_affinity auto;" } else { "" },
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    Ok(Peer {
        name: "nginx",
        addr,
        child: Some(child),
    })
}

pub(crate) fn caddy(dir: &Path, upstream: &str, tls: &Path) -> Result<Peer> {
    let addr = free_addr();
    let conf = format!(
        r#"{{
  admin off
  auto_https off
  default_sni alice.{BASE_DOMAIN}
  storage file_system {data}
}}
https://:{port} {{
  bind 127.0.0.1
  tls {crt} {key}
  reverse_proxy {upstream}
}}
"#,
        port = addr.port(),
        data = dir.join("caddy-data").display(),
        crt = tls.join("edge.crt.pem").display(),
        key = tls.join("edge.key.pem").display(),
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, conf)?;
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("XDG_DATA_HOME", dir.join("caddy-data"))
        .env("XDG_CONFIG_HOME", dir.join("caddy-config"))
        .stdout(std::fs::File::create(dir.join("caddy.log"))?)
        .stderr(std::fs::File::create(dir.join("caddy.err.log"))?)
        .spawn()
        .context("starting Caddy (apt-get install caddy)")?;
    Ok(Peer {
        name: "caddy",
        addr,
        child: Some(child),
    })
}

/// One request through `addr`; whether it answered 200.
pub(crate) fn answers(addr: SocketAddr, gw: &str) -> bool {
    Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("authorization: Bearer {gw}")])
        .args([
            "--resolve",
            &format!("alice.{BASE_DOMAIN}:{}:{}", addr.port(), addr.ip()),
        ])
        .arg(format!(
            "https://alice.{BASE_DOMAIN}:{}/v1/models",
            addr.port()
        ))
        .output()
        .map(|o| o.stdout == b"200")
        .unwrap_or(false)
}
