//! A real SMTP server for a test: aiosmtpd (PyPI, installed by
//! `scripts/test` into `.local/venv`) on a loopback port, delivering every
//! message into a Maildir the test reads. It can be stopped and started
//! again on the same port, as a mail server that goes away and comes back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_addr, workspace_root};

pub struct SmtpServer {
    port: u16,
    maildir: PathBuf,
    child: Option<Child>,
}

/// One delivered message: its headers as read, its text decoded.
#[derive(Debug, Clone)]
pub struct Received {
    pub to: String,
    pub subject: String,
    /// Every part's body, quoted-printable undone.
    pub body: String,
    pub file: PathBuf,
}

impl SmtpServer {
    /// Starts a server whose Maildir is `<dir>/mail`.
    pub async fn start(dir: &Path) -> Result<Self> {
        let mut s = SmtpServer {
            port: free_addr().port(),
            maildir: dir.join("mail"),
            child: None,
        };
        s.resume().await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Stops it: connections are refused until `resume`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and Maildir.
    pub async fn resume(&mut self) -> Result<()> {
        let bin = workspace_root().join(".local/venv/bin/aiosmtpd");
        if !bin.exists() {
            bail!(
                "{} is missing: run the suite with scripts/test",
                bin.display()
            );
        }
        std::fs::create_dir_all(self.maildir.parent().unwrap_or(Path::new(".")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.maildir.with_extension("log"))?;
        let child = Command::new(bin)
            .args(["-n", "-l", &format!("127.0.0.1:{}", self.port)])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&self.maildir)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting aiosmtpd")?;
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("aiosmtpd did not listen on port {}", self.port)
    }

    /// Every message delivered so far, oldest first.
    pub fn messages(&self) -> Result<Vec<Received>> {
        let dir = self.maildir.join("new");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => return Ok(Vec::new()),
        };
        files.sort_by_key(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok());
        files.into_iter().map(|f| parse(&f)).collect()
    }

    /// The messages to `to`.
    pub fn messages_to(&self, to: &str) -> Result<Vec<Received>> {
        Ok(self
            .messages()?
            .into_iter()
            .filter(|m| m.to.contains(to))
            .collect())
    }

    /// The token of the link (`#<fragment>=<token>`) in the newest mail
    /// titled `subject` to `to`, once one has arrived (within 20 s).
    pub async fn link_token(&self, to: &str, subject: &str, fragment: &str) -> Result<String> {
        crate::wait_for(Duration::from_secs(20), subject, || async {
            Ok(self.messages_to(to)?.iter().any(|m| m.subject == subject))
        })
        .await?;
        let mail = self
            .messages_to(to)?
            .into_iter()
            .rev()
            .find(|m| m.subject == subject)
            .context("the mail")?;
        let (_, rest) = mail
            .body
            .split_once(&format!("#{fragment}="))
            .context("the link")?;
        Ok(rest.chars().take_while(char::is_ascii_hexdigit).collect())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse(file: &Path) -> Result<Received> {
    let raw = std::fs::read_to_string(file)?.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    // Unfold continued header lines.
    let head = head.replace("\n ", " ").replace("\n\t", " ");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    Ok(Received {
        to: header("to"),
        subject: header("subject"),
        body: unquote(body),
        file: file.to_path_buf(),
    })
}

/// Quoted-printable undone (soft line breaks and `=XX`); other text kept.
fn unquote(s: &str) -> String {
    let s = s.replace("=\n", "");
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
