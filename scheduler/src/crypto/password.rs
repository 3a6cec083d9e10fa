//! Password hashing on a small fixed pool of threads, off the async
//! runtime. argon2id (OWASP: 19 MiB, 2 iterations, 1 lane) costs 19 MiB and
//! tens of milliseconds per call, so a bounded pool caps both the memory the
//! allocator keeps (one arena per hashing thread instead of one per blocking
//! thread) and the CPU a flood of logins can take; past the queue, callers
//! get a clear "busy" error instead of an unbounded backlog. Each thread
//! hashes into one reused 19 MiB buffer: allocating it per call fragments
//! the heap (RSS grew by over 200 MB in 15 hashes).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::error::{Error, Result};

const THREADS: usize = 2;
const QUEUE: usize = 256;

type Job = Box<dyn FnOnce() + Send>;

/// OWASP's minimum for argon2id: 19 MiB, 2 iterations, 1 lane.
fn params() -> Params {
    Params::new(19 * 1024, 2, 1, Some(32)).expect("static argon2 params")
}

fn pool() -> &'static SyncSender<Job> {
    static POOL: OnceLock<SyncSender<Job>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawning a hashing thread");
        }
        tx
    })
}

async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    match pool().try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            metrics::counter!("clawdeploy_password_queue_full_total").increment(1);
            return Err(Error::Busy(
                "too many sign-ins at once; try again in a moment".into(),
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(Error::Internal("password hashing threads are gone".into()))
        }
    }
    rx.await
        .map_err(|_| Error::Internal("password hashing job was dropped".into()))
}

thread_local! {
    /// The argon2 working memory of this hashing thread, reused per call.
    static BLOCKS: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs argon2 for `params` into `out`, in this thread's reused memory.
fn compute(
    alg: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let needed = params.block_count();
    BLOCKS.with(|cell| {
        let mut blocks = cell.borrow_mut();
        if blocks.len() < needed {
            blocks.resize(needed, Block::default());
        }
        Argon2::new(alg, version, params)
            .hash_password_into_with_memory(password, salt, out, &mut blocks[..needed])
            .map_err(Error::internal)
    })
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
pub async fn hash(password: String) -> Result<String> {
    run(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt
            .as_salt()
            .decode_b64(&mut salt_buf)
            .map_err(Error::internal)?;
        let params = params();
        let mut out = [0u8; 32];
        compute(
            Algorithm::Argon2id,
            Version::V0x13,
            params.clone(),
            password.as_bytes(),
            salt_bytes,
            &mut out,
        )?;
        let phc = PasswordHash {
            algorithm: argon2::ARGON2ID_IDENT,
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(Error::internal)?,
            salt: Some(salt.as_salt()),
            hash: Some(Output::new(&out).map_err(Error::internal)?),
        };
        Ok(phc.to_string())
    })
    .await?
}

/// Checks `password` against a stored PHC string, with the parameters the
/// string records (so hashes made under older parameters still verify).
pub async fn verify(password: String, stored: String) -> Result<bool> {
    run(move || {
        let parsed = PasswordHash::new(&stored).map_err(Error::internal)?;
        let alg = Algorithm::try_from(parsed.algorithm).map_err(Error::internal)?;
        let version = Version::try_from(parsed.version.unwrap_or(0x13)).map_err(Error::internal)?;
        let params = Params::try_from(&parsed).map_err(Error::internal)?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(Error::Internal(
                "stored password hash lacks salt or hash".into(),
            ));
        };
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(Error::internal)?;
        let mut out = vec![0u8; expected.len()];
        compute(
            alg,
            version,
            params,
            password.as_bytes(),
            salt_bytes,
            &mut out,
        )?;
        // `Output` compares in constant time.
        Ok(Output::new(&out).map_err(Error::internal)? == expected)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_only_the_right_password() {
        let h = hash("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse battery".into(), h.clone())
            .await
            .unwrap());
        assert!(!verify("wrong horse battery".into(), h).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_interoperate_with_the_reference_encoder() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        // Ours verifies with the crate's own verifier, and the crate's with ours.
        let ours = hash("interop-password-1".into()).await.unwrap();
        let reference = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        assert!(reference
            .verify_password(b"interop-password-1", &PasswordHash::new(&ours).unwrap())
            .is_ok());
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let theirs = reference
            .hash_password(b"interop-password-2", &salt)
            .unwrap()
            .to_string();
        assert!(verify("interop-password-2".into(), theirs.clone())
            .await
            .unwrap());
        assert!(!verify("interop-password-3".into(), theirs).await.unwrap());
    }

    #[tokio::test]
    async fn many_callers_share_the_fixed_pool() {
        let jobs: Vec<_> = (0..8)
            .map(|i| tokio::spawn(hash(format!("password-{i}-long-enough"))))
            .collect();
        for j in jobs {
            assert!(j.await.unwrap().unwrap().starts_with("$argon2id$"));
        }
    }
}
