//! The token an instance's gateway presents to the metering proxy in place
//! of a provider key. It is derived, not stored: `cdp_<instance>_<mac>`,
//! the MAC being HMAC-SHA256 keyed by the instance's container's gateway
//! token (256 random bits, sealed in the database). So it changes whenever
//! the gateway token does (a new container), dies with the instance's
//! container (release), and the proxy checks it by deriving it again from
//! the sealed gateway token; no table of tokens or hashes can leak them.

use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "cdp_";
const CONTEXT: &[u8] = b"clawdeploy-llm-proxy-token:v1:";

/// The proxy token of `instance_id` (its canonical hyphenated form) while
/// its container's gateway token is `gateway_token`.
pub fn derive(instance_id: &str, gateway_token: &str) -> String {
    format!(
        "{PREFIX}{}_{}",
        instance_id.replace('-', ""),
        hex::encode(mac(instance_id, gateway_token))
    )
}

fn mac(instance_id: &str, gateway_token: &str) -> [u8; 32] {
    // HMAC takes a key of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(gateway_token.as_bytes())
        .expect("HMAC accepts any key length");
    m.update(CONTEXT);
    m.update(instance_id.as_bytes());
    m.finalize().into_bytes().into()
}

/// The instance a token names (32 hex digits, as in a simple UUID), if it
/// is shaped like one; `verify` then says whether it is genuine.
pub fn instance_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (instance, mac) = rest.split_once('_')?;
    (instance.len() == 32
        && mac.len() == 64
        && instance.bytes().all(|b| b.is_ascii_hexdigit())
        && mac.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(instance)
}

/// Whether `token` is the one `instance_id` has under `gateway_token`
/// (compared in constant time).
pub fn verify(token: &str, instance_id: &str, gateway_token: &str) -> bool {
    let want = derive(instance_id, gateway_token);
    want.len() == token.len()
        && want
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2a7e-9b3d-4c5e-8f10-2a3b4c5d6e7f";

    #[test]
    fn a_token_names_its_instance_and_verifies_only_under_its_gateway_token() {
        let t = derive(ID, "gw-1");
        assert_eq!(instance_of(&t), Some("6f1c2a7e9b3d4c5e8f102a3b4c5d6e7f"));
        assert!(verify(&t, ID, "gw-1"));
        assert!(!verify(&t, ID, "gw-2"), "a new gateway token rotates it");
        let other = "00000000-0000-0000-0000-000000000001";
        assert!(!verify(&t, other, "gw-1"));
        assert_ne!(derive(other, "gw-1"), t);
    }

    #[test]
    fn malformed_tokens_name_nothing() {
        for bad in [
            "",
            "cdp_",
            "sk-abc",
            "cdp_zz_00",
            &format!("cdp_{}_{}", "a".repeat(32), "g".repeat(64)),
        ] {
            assert_eq!(instance_of(bad), None, "{bad}");
        }
    }
}
