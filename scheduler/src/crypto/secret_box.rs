//! Secrets at rest: AES-256-GCM with a random nonce, the associated data
//! binding each ciphertext to its owner and field so a value copied to another
//! row does not decrypt. Sealed format: `v1 | nonce | ciphertext`. The
//! key-encryption key lives outside the database (a file or an environment
//! variable); customers' keys sit under per-tenant data keys (`envelope`).

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};

use crate::error::{Error, Result};

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
            .map_err(|_| Error::Internal("secret key is not hex".into()))?;
        Self::from_bytes(&key)
    }

    /// A 32-byte key.
    pub fn from_bytes(key: &[u8]) -> Result<Self> {
        if key.len() != 32 {
            return Err(Error::Internal(format!(
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
            .map_err(|_| Error::Internal("encryption failed".into()))?;
        let mut out = Vec::with_capacity(1 + nonce.len() + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < 1 + 12 + 16 || sealed[0] != VERSION {
            return Err(Error::Internal("sealed secret is malformed".into()));
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
            .map_err(|_| Error::Internal(format!("secret for {aad} does not decrypt")))
    }

    pub fn open_string(&self, aad: &str, sealed: &[u8]) -> Result<String> {
        String::from_utf8(self.open(aad, sealed)?).map_err(Error::internal)
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
