//! State archives to and from object storage. The scheduler hands the agent
//! short-lived presigned URLs (the agent holds no storage credentials); the
//! agent exports a stopped container's state volume to a staging file while
//! hashing it, PUTs it, and reports its SHA-256 and size. An import GETs the
//! archive into a staging file while hashing it and imports it only when
//! both match what the scheduler recorded: a truncated or corrupt archive
//! leaves the target untouched.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::ContainerRuntime;
use crate::error::{Error, Result};

/// What an archive is: its SHA-256 (hex) and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    pub sha256: String,
    pub bytes: u64,
}

/// Moves state archives between this node's volumes and presigned URLs.
pub struct Transfers {
    client: reqwest::Client,
    staging: PathBuf,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Hashing<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.hasher.update(&buf[..n]);
            this.bytes += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn archive(self) -> Archive {
        Archive {
            sha256: hex::encode(self.hasher.finalize()),
            bytes: self.bytes,
        }
    }
}

fn failed(op: &'static str, message: impl Into<String>) -> Error {
    metrics::counter!("clawdeploy_agent_archive_transfers_total", "direction" => op, "result" => "failed")
        .increment(1);
    Error::Archive {
        op,
        message: message.into(),
    }
}

/// Removes a staging file when dropped, whatever happened.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Transfers {
    /// Archives are staged in `staging` (on the volumes' filesystem).
    pub fn new(staging: &Path) -> Result<Self> {
        std::fs::create_dir_all(staging)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Archive {
                op: "client",
                message: e.to_string(),
            })?;
        Ok(Transfers {
            client,
            staging: staging.to_owned(),
        })
    }

    /// Exports the stopped container's state to `put_url`.
    pub async fn upload<R: ContainerRuntime>(
        &self,
        rt: &R,
        container_id: &str,
        put_url: &str,
    ) -> Result<Archive> {
        let staged = Staged(self.staging.join(format!(".upload-{container_id}.tar")));
        let mut out = Hashing::new(tokio::fs::File::create(&staged.0).await?);
        rt.export_state(container_id, &mut out).await?;
        out.flush().await?;
        out.inner.sync_all().await?;
        let archive = out.archive();
        let file = tokio::fs::File::open(&staged.0).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let resp = self
            .client
            .put(put_url)
            .header(reqwest::header::CONTENT_LENGTH, archive.bytes)
            .body(body)
            .send()
            .await
            .map_err(|e| failed("upload", e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(failed(
                "upload",
                format!(
                    "the store answered {status}: {}",
                    &text[..text.len().min(300)]
                ),
            ));
        }
        metrics::counter!("clawdeploy_agent_archive_bytes_total", "direction" => "upload")
            .increment(archive.bytes);
        metrics::counter!("clawdeploy_agent_archive_transfers_total", "direction" => "upload", "result" => "ok")
            .increment(1);
        tracing::info!(
            container_id,
            bytes = archive.bytes,
            sha256 = archive.sha256,
            "state archive uploaded"
        );
        Ok(archive)
    }

    /// Imports the archive at `get_url` as the state of `container_id`
    /// (which must not be running), if it is exactly `expected`.
    pub async fn download<R: ContainerRuntime>(
        &self,
        rt: &R,
        container_id: &str,
        get_url: &str,
        expected: &Archive,
    ) -> Result<()> {
        let staged = Staged(self.staging.join(format!(".download-{container_id}.tar")));
        let resp = self
            .client
            .get(get_url)
            .send()
            .await
            .map_err(|e| failed("download", e.to_string()))?;
        if !resp.status().is_success() {
            return Err(failed(
                "download",
                format!("the store answered {}", resp.status()),
            ));
        }
        let mut out = Hashing::new(tokio::fs::File::create(&staged.0).await?);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| failed("download", e.to_string()))?;
            if out.bytes + chunk.len() as u64 > expected.bytes {
                return Err(failed("download", "the archive is longer than recorded"));
            }
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        let got = out.archive();
        if got != *expected {
            return Err(failed(
                "download",
                format!(
                    "the archive does not match its record ({} bytes, sha256 {}; recorded {} bytes, sha256 {})",
                    got.bytes, got.sha256, expected.bytes, expected.sha256
                ),
            ));
        }
        // The agent dying here (a test's crash point) leaves the target as
        // it was: the staged archive is not yet unpacked.
        crate::crash_point("import");
        let file = tokio::fs::File::open(&staged.0).await?;
        rt.import_state(container_id, file).await?;
        metrics::counter!("clawdeploy_agent_archive_bytes_total", "direction" => "download")
            .increment(got.bytes);
        metrics::counter!("clawdeploy_agent_archive_transfers_total", "direction" => "download", "result" => "ok")
            .increment(1);
        tracing::info!(container_id, bytes = got.bytes, "state archive imported");
        Ok(())
    }
}
