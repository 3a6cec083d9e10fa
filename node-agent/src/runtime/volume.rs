//! State volume export and import (for migration and backups): a tar
//! stream of the volume's directory. Only a stopped (or not yet created)
//! container's volume is copied, so the archive is consistent; an import is
//! unpacked beside the volume and swapped in whole.

use super::docker::{prepare_volume_dir, DockerRuntime};
use super::{ContainerRuntime, TENANT_UID};
use crate::error::{Error, Result};

impl DockerRuntime {
    async fn refuse_running(&self, container_id: &str, op: &'static str) -> Result<()> {
        if self.inspect(container_id).await?.is_some_and(|o| o.running) {
            return Err(Error::Archive {
                op,
                message: format!("container {container_id} is running; stop it first"),
            });
        }
        Ok(())
    }

    /// Writes the state volume of `container_id` as a tar archive to `out`;
    /// returns the bytes written.
    pub(super) async fn export_volume(
        &self,
        container_id: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<u64> {
        self.refuse_running(container_id, "export").await?;
        let dir = self.volume_dir(container_id);
        if !dir.is_dir() {
            return Err(Error::Archive {
                op: "export",
                message: format!("no state volume for {container_id}"),
            });
        }
        let mut child = tokio::process::Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&dir)
            .args(["-cf", "-", "."])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let n = tokio::io::copy(&mut stdout, out).await?;
        tokio::io::AsyncWriteExt::flush(out).await?;
        let done = child.wait_with_output().await?;
        if !done.status.success() {
            return Err(Error::Archive {
                op: "export",
                message: String::from_utf8_lossy(&done.stderr).into_owned(),
            });
        }
        Ok(n)
    }

    /// Replaces the state volume of `container_id` with the tar archive read
    /// from `input`. The container may not exist yet (it is then created on
    /// top of the imported state); a running one is refused.
    pub(super) async fn import_volume(
        &self,
        container_id: &str,
        mut input: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<()> {
        self.refuse_running(container_id, "import").await?;
        let dir = self.volume_dir(container_id);
        // Unpacked beside the volume, then swapped in: a broken stream
        // leaves the old state untouched.
        let staging = self.volumes_dir.join(format!(".import-{container_id}"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        prepare_volume_dir(&staging)?;
        let mut child = tokio::process::Command::new("tar")
            .args(["--numeric-owner", "--no-same-permissions", "-C"])
            .arg(&staging)
            .args(["-xf", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let copied = tokio::io::copy(&mut input, &mut stdin).await;
        drop(stdin);
        let done = child.wait_with_output().await?;
        if let Err(e) = copied {
            std::fs::remove_dir_all(&staging).ok();
            return Err(e.into());
        }
        if !done.status.success() {
            std::fs::remove_dir_all(&staging).ok();
            return Err(Error::Archive {
                op: "import",
                message: String::from_utf8_lossy(&done.stderr).into_owned(),
            });
        }
        // Everything in a tenant's volume belongs to the tenant user.
        let chown = tokio::process::Command::new("chown")
            .args([
                "-R",
                "--no-dereference",
                &format!("{TENANT_UID}:{TENANT_UID}"),
            ])
            .arg(&staging)
            .status()
            .await?;
        if !chown.success() {
            std::fs::remove_dir_all(&staging).ok();
            return Err(Error::Archive {
                op: "import",
                message: "chown of the imported state failed".into(),
            });
        }
        prepare_volume_dir(&staging)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&staging, &dir)?;
        Ok(())
    }
}
