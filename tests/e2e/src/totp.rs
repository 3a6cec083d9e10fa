//! TOTP codes as an authenticator app computes them, by an implementation
//! that shares nothing with the scheduler's: RFC 6238 in a few lines of
//! Python's `hmac`, `hashlib` and `base64`.

use std::process::Command;

use anyhow::{ensure, Context, Result};

const RFC_6238: &str = "import base64, hashlib, hmac, struct, sys, time
secret = sys.argv[1].upper()
key = base64.b32decode(secret + '=' * (-len(secret) % 8))
now = int(sys.argv[3]) if len(sys.argv) > 3 else int(time.time())
step = now // 30 + int(sys.argv[2])
digest = hmac.new(key, struct.pack('>Q', step), hashlib.sha1).digest()
offset = digest[19] & 15
value = struct.unpack('>I', digest[offset:offset + 4])[0] & 0x7fffffff
print('%06d' % (value % 1000000))";

/// The six-digit code of `secret` (base32) for the time step `steps` away
/// from now (0: the current one, 1: the next).
pub fn code(secret: &str, steps: i64) -> Result<String> {
    run(&["-c", RFC_6238, secret, &steps.to_string()])
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new("python3")
        .args(args)
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(code.len() == 6, "not a code: {code:?}");
    Ok(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_codes_are_rfc_6238s() {
        // "12345678901234567890" in base32 (RFC 6238's SHA-1 secret); at
        // T = 59 s its eight digits are 94287082, at 1111111109 07081804.
        let secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        let at = |t: &str| super::run(&["-c", super::RFC_6238, secret, "0", t]).unwrap();
        assert_eq!(at("59"), "287082");
        assert_eq!(at("1111111109"), "081804");
        assert_eq!(super::code(secret, 0).unwrap().len(), 6);
    }
}
