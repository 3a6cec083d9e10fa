//! AWS Signature Version 4 for S3, in its query-string form: a presigned
//! URL carries its credential scope, date, lifetime and signature, so
//! whoever holds it (an agent; the scheduler's own HEAD and DELETE) needs
//! no key. The payload is unsigned (`UNSIGNED-PAYLOAD`): archives are
//! checked by the SHA-256 the scheduler records, not by S3. The only
//! signed header is `host`. Specified in AWS's "Authenticating Requests:
//! Using Query Parameters (AWS Signature Version 4)"; the unit test below
//! is that page's example.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The longest a SigV4 presigned URL may live (seven days).
pub const MAX_EXPIRES: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who signs, where.
pub struct Credentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
}

/// A request to presign: `scheme://authority` and the path as it will be
/// sent (its segments not yet encoded).
pub struct Presign<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// Host, with `:port` when the URL carries one (exactly what the
    /// `Host` header will say).
    pub authority: &'a str,
    /// Starts with `/`; each segment is encoded here.
    pub path: &'a str,
    pub expires: Duration,
    pub now: DateTime<Utc>,
}

/// The presigned URL.
pub fn presign(creds: &Credentials<'_>, req: &Presign<'_>) -> String {
    let date = req.now.format("%Y%m%d").to_string();
    let stamp = req.now.format("%Y%m%dT%H%M%SZ").to_string();
    let scope = format!("{date}/{}/s3/aws4_request", creds.region);
    let expires = req.expires.min(MAX_EXPIRES).as_secs().max(1);
    let path = encode_path(req.path);
    // Already in byte order of their (encoded) names, as SigV4 wants.
    let query = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_owned()),
        (
            "X-Amz-Credential",
            format!("{}/{scope}", creds.access_key_id),
        ),
        ("X-Amz-Date", stamp.clone()),
        ("X-Amz-Expires", expires.to_string()),
        ("X-Amz-SignedHeaders", "host".to_owned()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", encode(v, true)))
    .collect::<Vec<_>>()
    .join("&");
    let canonical = format!(
        "{}\n{path}\n{query}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD",
        req.method, req.authority
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let key = [date.as_str(), creds.region, "s3", "aws4_request"]
        .iter()
        .fold(
            format!("AWS4{}", creds.secret_access_key).into_bytes(),
            |key, part| hmac(&key, part.as_bytes()),
        );
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    format!(
        "{}://{}{path}?{query}&X-Amz-Signature={signature}",
        req.scheme, req.authority
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Each segment of `path` URI-encoded, the slashes kept.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|segment| encode(segment, false))
        .collect::<Vec<_>>()
        .join("/")
}

/// SigV4's URI encoding: every byte but `A-Z a-z 0-9 - . _ ~` as `%XX`
/// (upper-case hex); `/` too when `slash`.
fn encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            b'/' if !slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// The example of AWS's "Authenticating Requests: Using Query
    /// Parameters": a GET of `test.txt` in `examplebucket`, valid for 24
    /// hours from 2013-05-24 00:00:00 UTC.
    #[test]
    fn the_documented_example_signs_as_aws_does() {
        let url = presign(
            &Credentials {
                access_key_id: "AKIAIOSFODNN7EXAMPLE",
                secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                region: "us-east-1",
            },
            &Presign {
                method: "GET",
                scheme: "https",
                authority: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                expires: Duration::from_secs(86400),
                now: Utc.with_ymd_and_hms(2013, 5, 24, 0, 0, 0).unwrap(),
            },
        );
        assert_eq!(
            url,
            "https://examplebucket.s3.amazonaws.com/test.txt\
             ?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn paths_are_encoded_by_segment_and_lifetimes_bounded() {
        assert_eq!(
            encode_path("/b/instances/a b/ü.tar"),
            "/b/instances/a%20b/%C3%BC.tar"
        );
        assert_eq!(encode("a/b~c", true), "a%2Fb~c");
        let url = presign(
            &Credentials {
                access_key_id: "k",
                secret_access_key: "s",
                region: "r",
            },
            &Presign {
                method: "PUT",
                scheme: "http",
                authority: "127.0.0.1:9000",
                path: "/bucket/key.tar",
                expires: Duration::from_secs(30 * 24 * 3600),
                now: Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap(),
            },
        );
        assert!(
            url.starts_with("http://127.0.0.1:9000/bucket/key.tar?"),
            "{url}"
        );
        assert!(
            url.contains("&X-Amz-Expires=604800&"),
            "at most seven days: {url}"
        );
    }
}
