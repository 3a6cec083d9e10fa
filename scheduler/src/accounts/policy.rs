//! What an account's email and password must be: a normalised address, and
//! a password policy (10 to 256 characters, not one character repeated, not
//! a well-known password, not built on the email address).

use crate::error::{Error, Result};

pub fn normalize_email(raw: &str) -> Result<String> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Error::Invalid {
            field: "email",
            message: "must be a valid email address".into(),
        })
    }
}

/// Passwords that are long enough and still among the first an attacker tries.
const COMMON: &[&str] = &[
    "1234567890",
    "12345678910",
    "123456789012",
    "0123456789",
    "9876543210",
    "password12",
    "password123",
    "password1234",
    "passw0rd123",
    "qwertyuiop",
    "qwerty1234",
    "qwerty123456",
    "1q2w3e4r5t",
    "1qaz2wsx3edc",
    "abcdefghij",
    "iloveyou123",
    "letmein1234",
    "welcome123",
    "changeme123",
    "administrator",
];

/// The password policy: 10 to 256 characters, not one character repeated,
/// not a well-known password, and not built on the email address.
pub fn check_password(password: &str, email: &str) -> Result<()> {
    let invalid = |m: &str| {
        Err(Error::Invalid {
            field: "password",
            message: m.into(),
        })
    };
    let n = password.chars().count();
    if !(10..=256).contains(&n) {
        return invalid("must be 10 to 256 characters");
    }
    let mut chars = password.chars();
    let first = chars.next();
    if chars.all(|c| Some(c) == first) {
        return invalid("must not be one character repeated");
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) {
        return invalid("is too common; choose another");
    }
    let local = email.split('@').next().unwrap_or_default();
    if local.chars().count() >= 3 && lower.contains(local) {
        return invalid("must not contain your email address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_policy_refuses_weak_ones() {
        let email = "alice.smith@example.com";
        assert!(check_password("correct-horse-battery", email).is_ok());
        for bad in [
            "short",
            "aaaaaaaaaaaa",
            "Password123",
            "qwertyuiop",
            "my-alice.smith-pass",
        ] {
            assert!(check_password(bad, email).is_err(), "{bad}");
        }
        assert!(check_password(&"x".repeat(257), email).is_err());
        assert!(check_password(&"ab".repeat(128), email).is_ok());
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email("  Alice@Example.COM ").unwrap(),
            "alice@example.com"
        );
        for bad in [
            "",
            "alice",
            "@x.com",
            "a@b",
            "a b@x.com",
            "a@@x.com",
            "a@x.com.",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }
}
