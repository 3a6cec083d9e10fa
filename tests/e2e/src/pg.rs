//! A PostgreSQL server of a test's own (Debian's binaries, `initdb` into the
//! test's directory, a free loopback port), for the tests that restart or
//! stop the database: the suite's shared server must stay up for the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::free_addr;

pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    addr: SocketAddr,
}

impl PgServer {
    /// A server under `.local/e2e/pg-<tag>-<random>`.
    pub fn for_test(tag: &str) -> Result<Self> {
        let dir = crate::workspace_root().join(".local/e2e").join(format!(
            "pg-{tag}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        Self::start(&dir)
    }

    /// `initdb` under `dir` and start it.
    pub fn start(dir: &Path) -> Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's binaries (/usr/lib/postgresql)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .context("no initdb under /usr/lib/postgresql")?;
        let pg = PgServer {
            bin,
            data: dir.join("pgdata"),
            addr: free_addr(),
        };
        std::fs::create_dir_all(dir)?;
        pg.chown(dir)?;
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )?;
        pg.ctl(&["start"])?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server comes
    /// back on the same port.
    pub fn restart_fast(&self) -> Result<()> {
        self.ctl(&["restart", "-m", "fast"])
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop_fast(&self) -> Result<()> {
        self.ctl(&["stop", "-m", "fast"])
    }

    /// Starts it again after `stop_fast`.
    pub fn start_again(&self) -> Result<()> {
        self.ctl(&["start"])
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200 -c fsync=off -c synchronous_commit=off",
            self.addr.port(),
            self.data.parent().unwrap_or(&self.data).display()
        );
        let log = self.data.with_file_name("postgres.log");
        let mut all = vec!["-D", self.data.to_str().context("data dir")?, "-w"];
        all.extend_from_slice(args);
        if args[0] != "stop" {
            all.extend_from_slice(&["-o", &opts, "-l", log.to_str().context("log")?]);
        }
        self.run("pg_ctl", &all)
    }

    /// Runs one of PostgreSQL's programs, as `postgres` when this is root
    /// (the server refuses to run as root).
    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn chown(&self, dir: &Path) -> Result<()> {
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir)
                .status()?;
            anyhow::ensure!(st.success(), "chown {} failed", dir.display());
        }
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "stop",
                "-m",
                "immediate",
            ],
        );
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
