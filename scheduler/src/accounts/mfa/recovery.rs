//! Recovery codes: ten per account, each ten characters of Crockford's
//! base32 (50 random bits), shown once as `xxxxx-xxxxx` and kept only as
//! their SHA-256. Each works once; a new set replaces the old.

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::Result;

/// Codes in a set.
pub const RECOVERY_CODES: usize = 10;
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A code as it is compared: lower case, without spaces or dashes.
fn normalize(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

fn digest(code: &str) -> Vec<u8> {
    Sha256::digest(normalize(code).as_bytes()).to_vec()
}

fn fresh() -> String {
    let mut bytes = [0u8; 10];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let chars: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect();
    format!("{}-{}", &chars[..5], &chars[5..])
}

/// Replaces the account's set inside the caller's transaction; returns
/// the new codes.
pub(super) async fn replace(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<Vec<String>> {
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| fresh()).collect();
    let hashes: Vec<Vec<u8>> = codes.iter().map(|c| digest(c)).collect();
    sqlx::query(
        "INSERT INTO recovery_codes (user_id, code_hash)
         SELECT $1, h FROM unnest($2::bytea[]) AS h ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    Ok(codes)
}

/// Uses one of the account's codes, if `code` is one not used yet; returns
/// how many remain unused.
pub(super) async fn spend(
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    code: &str,
) -> Result<Option<i64>> {
    let used = sqlx::query(
        "UPDATE recovery_codes SET used_at = now()
          WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
    )
    .bind(user_id)
    .bind(digest(code))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if used == 0 {
        return Ok(None);
    }
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL",
    )
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Some(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_ten_base32_characters_in_two_groups() {
        let c = fresh();
        assert_eq!(c.len(), 11);
        assert_eq!(&c[5..6], "-");
        assert!(c.replace('-', "").bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(fresh(), fresh());
    }

    #[test]
    fn a_code_is_the_same_code_however_it_is_typed() {
        assert_eq!(digest("ab3de-fgh45"), digest(" AB3DE FGH45 "));
        assert_eq!(digest("ab3de-fgh45"), digest("ab3defgh45"));
        assert_ne!(digest("ab3de-fgh45"), digest("ab3de-fgh46"));
    }
}
