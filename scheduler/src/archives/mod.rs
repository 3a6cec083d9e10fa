//! Where state archives go: an S3-compatible bucket. The scheduler holds the
//! credentials and hands agents short-lived presigned URLs only; an agent
//! streams a stopped container's state to a PUT URL and imports it from a
//! GET URL, checking the SHA-256 the scheduler recorded. One path for
//! migrations, backups and the export before a release is destroyed.

use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::ObjectStore;
use uuid::Uuid;

use crate::error::{Error, Result};

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
    #[arg(long = "archive-url-ttl-secs", env = "CLAWDEPLOY_ARCHIVE_URL_TTL_SECS", default_value = "900", value_parser = crate::app::config::secs_at_least_1)]
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
    s3: AmazonS3,
    url_ttl: Duration,
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

fn storage(e: object_store::Error) -> Error {
    Error::Storage(e.to_string())
}

impl Archives {
    pub fn new(cfg: &ArchiveConfig) -> Result<Self> {
        let s3 = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            // Path-style URLs: S3-compatible servers rarely serve buckets
            // as subdomains; plain HTTP only where the endpoint says so.
            .with_virtual_hosted_style_request(false)
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .build()
            .map_err(storage)?;
        Ok(Archives {
            s3,
            url_ttl: cfg.url_ttl,
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

    async fn signed(&self, method: http::Method, key: &str) -> Result<String> {
        let url = self
            .s3
            .signed_url(method, &Path::from(key), self.url_ttl)
            .await
            .map_err(storage)?;
        Ok(url.to_string())
    }

    /// A URL an agent may PUT the archive `key` to, for the URL lifetime.
    pub async fn upload_url(&self, key: &str) -> Result<String> {
        self.signed(http::Method::PUT, key).await
    }

    /// A URL an agent may GET the archive `key` from, for the URL lifetime.
    pub async fn download_url(&self, key: &str) -> Result<String> {
        self.signed(http::Method::GET, key).await
    }

    /// The archive's size, if it is there.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.s3.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.s3.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage(e)),
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
