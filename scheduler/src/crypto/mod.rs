//! Cryptography: the secret box (AES-256-GCM) and the key-encryption key,
//! per-instance envelopes, password hashing, and the platform's certificate
//! authority. Nothing here knows about requests or sessions.

pub mod envelope;
pub mod password;
pub mod pki;

use std::path::Path;

use anyhow::Context;

pub use clawdeploy_common::sealed::{random_token, SealError, SecretBox};

/// The associated data that binds each sealed value to its owner and field,
/// so a value copied to another row does not decrypt.
pub mod aad {
    use uuid::Uuid;

    pub use clawdeploy_common::sealed::aad::{data_key, gateway_token, secret};

    /// A stored idempotent answer (sealed under the KEK).
    pub fn idempotent_answer(user_id: Uuid, key: &str) -> String {
        format!("idempotency:{user_id}:{key}")
    }

    /// A custom domain certificate's private key (sealed under the KEK).
    pub fn domain_key(instance_id: Uuid, hostname: &str) -> String {
        format!("domain:{instance_id}:{hostname}:key")
    }

    /// The ACME account's credentials (sealed under the KEK).
    pub fn acme_account(directory_url: &str) -> String {
        format!("acme-account:{directory_url}")
    }

    /// A secret a queued mail carries (a link's token), sealed under the
    /// KEK until the mail is sent.
    pub fn outbox_secret(dedupe_key: &str) -> String {
        format!("outbox:{dedupe_key}")
    }

    /// An account's TOTP secret (sealed under the KEK).
    pub fn totp_secret(user_id: Uuid) -> String {
        format!("user:{user_id}:totp")
    }
}

/// Whether two byte strings are equal, in a time that depends on their
/// lengths only (for secrets a client guesses: codes, digests).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key-encryption key: given (64 hex characters), or
/// `<data_dir>/secret.key`, made (mode 0600) when missing.
pub fn key_from(given: Option<&str>, data_dir: &Path) -> anyhow::Result<SecretBox> {
    let hex_key = match given {
        Some(k) => k.to_owned(),
        None => {
            let path = data_dir.join("secret.key");
            if !path.exists() {
                std::fs::create_dir_all(data_dir)?;
                std::fs::write(&path, SecretBox::generate_key_hex())?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(path = %path.display(), "generated a new secret key; keep it safe, secrets are unreadable without it");
            }
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    Ok(SecretBox::from_hex(&hex_key)?)
}
