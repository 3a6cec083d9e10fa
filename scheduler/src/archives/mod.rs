//! Where state archives go: an S3-compatible bucket. The scheduler holds the
//! credentials and hands agents short-lived presigned URLs only; an agent
//! streams a stopped container's state to a PUT URL and imports it from a
//! GET URL, checking the SHA-256 the scheduler recorded. One path for
//! migrations, backups and the export before a release is destroyed. The
//! URLs are signed here (`sigv4.rs`); the scheduler's own HEAD and DELETE
//! use such URLs too, so nothing else speaks S3.

use std::time::Duration;

use uuid::Uuid;

use crate::error::{Error, Result};

pub mod sigv4;

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// `https://s3.<region>.amazonaws.com`, or any S3-compatible endpoint.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// How long a presigned URL is valid.
    pub url_ttl: Duration,
}

/// The `--archive-*` flags: archives are on when a bucket is given.
#[derive(Clone, Debug, clap::Args)]
pub struct ArchiveFlags {
    /// S3-compatible endpoint for state archives (migrations, backups).
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_ENDPOINT", requires = "archive_bucket")]
    pub archive_endpoint: Option<String>,
    /// The archives' bucket; without it archives are off.
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_BUCKET", requires = "archive_endpoint")]
    pub archive_bucket: Option<String>,
    #[arg(long, env = "CLAWDEPLOY_ARCHIVE_REGION", default_value = "us-east-1")]
    pub archive_region: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_ARCHIVE_ACCESS_KEY_ID",
        hide_env_values = true,
        default_value = ""
    )]
    pub archive_access_key_id: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_ARCHIVE_SECRET_ACCESS_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub archive_secret_access_key: String,
    /// Seconds a presigned archive URL handed to an agent stays valid.
    #[arg(long = "archive-url-ttl-secs", env = "CLAWDEPLOY_ARCHIVE_URL_TTL_SECS", default_value = "900", value_parser = clawdeploy_common::flags::nonzero_secs)]
    pub archive_url_ttl: Duration,
}

impl ArchiveFlags {
    /// The store's configuration, when a bucket is given.
    pub fn config(&self) -> Option<ArchiveConfig> {
        let bucket = self.archive_bucket.clone()?;
        Some(ArchiveConfig {
            endpoint: self.archive_endpoint.clone().unwrap_or_default(),
            bucket,
            region: self.archive_region.clone(),
            access_key_id: self.archive_access_key_id.clone(),
            secret_access_key: self.archive_secret_access_key.clone(),
            url_ttl: self.archive_url_ttl,
        })
    }
}

/// The bucket, and the presigned URLs the agents use.
#[derive(Debug)]
pub struct Archives {
    scheme: String,
    /// `host[:port]` of the endpoint, as the `Host` header says it.
    authority: String,
    /// Path-style: `/<bucket>` (S3-compatible servers rarely serve buckets
    /// as subdomains).
    bucket_path: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    url_ttl: Duration,
    /// The scheduler's own HEAD and DELETE, over presigned URLs too.
    http: reqwest::Client,
}

/// The configured store, or the error a request that needs one gets
/// (`503 archives_disabled`): migrations, backups and restores all ask.
pub fn required(archives: Option<&Archives>) -> Result<&Archives> {
    archives.ok_or_else(|| Error::Disabled {
        code: "archives_disabled",
        message: "no archive store is configured (--archive-endpoint)".into(),
    })
}

/// What an archive is for; part of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Migration,
    Backup,
    Release,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Migration => "migration",
            Purpose::Backup => "backup",
            Purpose::Release => "release",
        }
    }
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

impl Archives {
    pub fn new(cfg: &ArchiveConfig) -> Result<Self> {
        let url = reqwest::Url::parse(&cfg.endpoint)
            .map_err(|e| storage(format!("archive endpoint {:?}: {e}", cfg.endpoint)))?;
        let host = url
            .host_str()
            .filter(|_| matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| {
                storage(format!(
                    "archive endpoint {:?} is not an http(s) URL",
                    cfg.endpoint
                ))
            })?;
        if cfg.bucket.is_empty() || cfg.bucket.contains('/') {
            return Err(storage(format!(
                "archive bucket {:?} is not a bucket name",
                cfg.bucket
            )));
        }
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(storage)?;
        Ok(Archives {
            scheme: url.scheme().to_owned(),
            authority,
            bucket_path: format!("/{}", cfg.bucket),
            region: cfg.region.clone(),
            access_key_id: cfg.access_key_id.clone(),
            secret_access_key: cfg.secret_access_key.clone(),
            url_ttl: cfg.url_ttl,
            http,
        })
    }

    /// The key of a new archive of `instance_id`'s state.
    pub fn key(instance_id: Uuid, purpose: Purpose) -> String {
        format!(
            "instances/{instance_id}/{}/{}.tar",
            purpose.as_str(),
            Uuid::new_v4().simple()
        )
    }

    fn signed(&self, method: &str, key: &str, ttl: Duration) -> String {
        sigv4::presign(
            &sigv4::Credentials {
                access_key_id: &self.access_key_id,
                secret_access_key: &self.secret_access_key,
                region: &self.region,
            },
            &sigv4::Presign {
                method,
                scheme: &self.scheme,
                authority: &self.authority,
                path: &format!("{}/{key}", self.bucket_path),
                expires: ttl,
                now: chrono::Utc::now(),
            },
        )
    }

    /// A URL an agent may PUT the archive `key` to, for the URL lifetime.
    pub async fn upload_url(&self, key: &str) -> Result<String> {
        Ok(self.signed("PUT", key, self.url_ttl))
    }

    /// A URL an agent may GET the archive `key` from, for the URL lifetime.
    pub async fn download_url(&self, key: &str) -> Result<String> {
        Ok(self.signed("GET", key, self.url_ttl))
    }

    /// The scheduler's own request on `key` (a URL for a minute).
    async fn call(&self, method: reqwest::Method, key: &str) -> Result<reqwest::Response> {
        let url = self.signed(method.as_str(), key, Duration::from_secs(60));
        self.http
            .request(method, url)
            .send()
            .await
            .map_err(|e| storage(format!("archive store unreachable: {e}")))
    }

    /// The archive's size, if it is there.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        let resp = self.call(reqwest::Method::HEAD, key).await?;
        match resp.status() {
            s if s.is_success() => resp
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map(Some)
                .ok_or_else(|| storage(format!("HEAD {key}: no Content-Length"))),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s => Err(storage(format!("HEAD {key}: {s}"))),
        }
    }

    /// Deletes the archive (one that is not there is as good as deleted).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let resp = self.call(reqwest::Method::DELETE, key).await?;
        match resp.status() {
            s if s.is_success() || s == reqwest::StatusCode::NOT_FOUND => Ok(()),
            s => Err(storage(format!("DELETE {key}: {s}"))),
        }
    }
}

/// The archive an agent reports for a container it was asked to export
/// (for a migration or a backup: `archive_id` names which).
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub archive_id: String,
    pub sha256: String,
    pub bytes: u64,
    /// Empty on success.
    pub error: String,
}
