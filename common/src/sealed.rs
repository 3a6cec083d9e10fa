//! Secrets at rest: AES-256-GCM with a random nonce, the associated data
//! binding each ciphertext to its owner and field so a value copied to another
//! row does not decrypt. Sealed format: `v1 | nonce | ciphertext`. The
//! scheduler seals (and keeps the key-encryption key outside the database);
//! the metering proxy opens customers' provider keys, so both share this.

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};

/// Why a key or a sealed value was refused. Carries no secret.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{0}")]
    BadKey(String),
    #[error("encryption failed")]
    Encrypt,
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("secret for {0} does not decrypt")]
    DoesNotOpen(String),
    #[error("secret for {0} is not UTF-8")]
    NotText(String),
}

type Result<T> = std::result::Result<T, SealError>;

const VERSION: u8 = 1;

#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
    /// Names the key without revealing it: the first 8 bytes of its SHA-256.
    id: String,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// `key_hex`: 64 hex characters (32 bytes).
    pub fn from_hex(key_hex: &str) -> Result<Self> {
        let key = hex::decode(key_hex.trim())
            .map_err(|_| SealError::BadKey("secret key is not hex".into()))?;
        Self::from_bytes(&key)
    }

    /// A 32-byte key.
    pub fn from_bytes(key: &[u8]) -> Result<Self> {
        if key.len() != 32 {
            return Err(SealError::BadKey(format!(
                "secret key must be 32 bytes, got {}",
                key.len()
            )));
        }
        use sha2::Digest;
        Ok(Self {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
            id: hex::encode(&sha2::Sha256::digest(key)[..8]),
        })
    }

    /// A fresh random key: its bytes (to be wrapped) and its box.
    pub fn generate() -> Result<(Vec<u8>, Self)> {
        let key = Aes256Gcm::generate_key(OsRng).to_vec();
        let b = Self::from_bytes(&key)?;
        Ok((key, b))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn generate_key_hex() -> String {
        hex::encode(Aes256Gcm::generate_key(OsRng))
    }

    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Encrypt)?;
        let mut out = Vec::with_capacity(1 + nonce.len() + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < 1 + 12 + 16 || sealed[0] != VERSION {
            return Err(SealError::Malformed);
        }
        let nonce = Nonce::from_slice(&sealed[1..13]);
        self.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[13..],
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::DoesNotOpen(aad.to_owned()))
    }

    pub fn open_string(&self, aad: &str, sealed: &[u8]) -> Result<String> {
        String::from_utf8(self.open(aad, sealed)?).map_err(|_| SealError::NotText(aad.to_owned()))
    }
}

/// The associated data of the sealed values both the scheduler (which
/// seals them) and the metering proxy (which opens them) name.
pub mod aad {
    use std::fmt::Display;

    /// A container's gateway token (sealed under the KEK).
    pub fn gateway_token(container_id: impl Display) -> String {
        format!("container:{container_id}:gateway_token")
    }

    /// A provider key of an instance (sealed under its data key).
    pub fn secret(instance_id: impl Display, name: &str) -> String {
        format!("instance:{instance_id}:{name}")
    }

    /// An instance's data key (wrapped by the KEK).
    pub fn data_key(instance_id: impl Display) -> String {
        format!("dek:{instance_id}")
    }
}

/// A random token of `bytes` bytes, hex encoded.
pub fn random_token(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let b = SecretBox::from_hex(&SecretBox::generate_key_hex()).unwrap();
        let sealed = b.seal("instance:1:openai", b"sk-test").unwrap();
        assert_eq!(b.open("instance:1:openai", &sealed).unwrap(), b"sk-test");
        assert!(
            b.open("instance:2:openai", &sealed).is_err(),
            "moved ciphertext must not open"
        );
        assert!(!sealed.windows(7).any(|w| w == b"sk-test"));
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(SecretBox::from_hex("abcd").is_err());
        assert!(SecretBox::from_hex("zz").is_err());
    }
}
