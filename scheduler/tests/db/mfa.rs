//! Two-factor sign-in over the router, with codes computed by the test's
//! own RFC 6238 (HMAC-SHA-1 by hand, not the crate the scheduler uses): a
//! code signs in once and never again, a recovery code works once, five
//! wrong codes lock the login's token, new recovery codes void the old,
//! and turning it off asks for the password and a code.

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const PW: &str = "correct-horse-battery";

/// RFC 4648 base32 (upper case, no padding) to bytes.
fn base32(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut bits, mut n, mut out) = (0u64, 0u32, Vec::new());
    for c in s.trim_end_matches('=').bytes() {
        let v = A.iter().position(|&a| a == c).expect("base32") as u64;
        bits = (bits << 5) | v;
        n += 5;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// The six-digit code of time step `step` (RFC 4226 dynamic truncation).
fn code_at(secret: &[u8], step: u64) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).unwrap();
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let o = usize::from(h[19] & 0xf);
    let v = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]);
    format!("{:06}", v % 1_000_000)
}

fn step_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

#[test]
fn the_tests_own_totp_gives_rfc_6238s_answers() {
    // Appendix B, SHA-1, the last six of the eight digits.
    assert_eq!(code_at(b"12345678901234567890", 59 / 30), "287082");
    assert_eq!(
        code_at(b"12345678901234567890", 1_111_111_109 / 30),
        "081804"
    );
    assert_eq!(base32("GEZDGNBV"), b"12345");
}

async fn login(api: &Api, email: &str) -> Value {
    let (status, body) = api
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"email": email, "password": PW})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn second_step(api: &Api, mfa_token: &str, factor: Value) -> (u16, Value) {
    let mut body = factor;
    body["mfaToken"] = json!(mfa_token);
    api.call(Method::POST, "/api/auth/login/mfa", None, Some(body))
        .await
}

#[tokio::test]
async fn totp_signs_in_once_per_code_recovery_codes_once_and_tries_are_limited() {
    let app = app().await;
    let api = Api::serve(app.clone(), "mfa-test").await;
    let email = "two-factor@example.com";
    let s = register(&app, email, "").await;
    let token = s.token.as_str();

    // Setting up asks for the password again.
    let (status, body) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp",
            Some(token),
            Some(json!({"password": "wrong-password"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("wrong_password"))
    );
    let (status, setup) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp",
            Some(token),
            Some(json!({"password": PW})),
        )
        .await;
    assert_eq!(status, 200, "{setup}");
    let secret = base32(setup["secret"].as_str().unwrap());
    assert_eq!(secret.len(), 20);
    let url = setup["otpauthUrl"].as_str().unwrap();
    assert!(url.starts_with("otpauth://totp/ClawDeploy:"), "{url}");
    let png = setup["qrPng"].as_str().unwrap();
    let png = png
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png)
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Not on yet: a login still needs the password alone.
    assert!(login(&api, email).await["token"].is_string());

    // Confirming with a wrong code changes nothing; with the right one,
    // ten recovery codes, once.
    let now = step_now();
    let wrong = if code_at(&secret, now) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let (status, body) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp/confirm",
            Some(token),
            Some(json!({"code": wrong})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("wrong_code"))
    );
    let (status, on) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp/confirm",
            Some(token),
            Some(json!({"code": code_at(&secret, now)})),
        )
        .await;
    assert_eq!(status, 200, "{on}");
    let codes: Vec<String> = serde_json::from_value(on["recoveryCodes"].clone()).unwrap();
    assert_eq!(codes.len(), 10);

    // A login now stops at the second step.
    let first = login(&api, email).await;
    assert_eq!(first["mfaRequired"], true, "{first}");
    assert!(first.get("token").is_none());
    let mfa_token = first["mfaToken"].as_str().unwrap();
    // The code already used to confirm is refused; the next step's works,
    // once.
    let (status, body) = second_step(&api, mfa_token, json!({"code": code_at(&secret, now)})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("wrong_code"))
    );
    let next = code_at(&secret, now + 1);
    let (status, signed_in) = second_step(&api, mfa_token, json!({"code": next})).await;
    assert_eq!(status, 200, "{signed_in}");
    assert!(signed_in["token"].as_str().unwrap().starts_with("cdt_"));
    let (status, _) = second_step(&api, mfa_token, json!({"code": next})).await;
    assert_eq!(status, 401, "a finished token is spent");
    let again = login(&api, email).await;
    let (status, body) = second_step(
        &api,
        again["mfaToken"].as_str().unwrap(),
        json!({"code": next}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("wrong_code")),
        "the same code twice"
    );

    // A recovery code works once (typed in capitals, without its dash).
    let typed = codes[0].replace('-', "").to_uppercase();
    let t = login(&api, email).await["mfaToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = second_step(&api, &t, json!({"recoveryCode": typed})).await;
    assert_eq!(status, 200, "{body}");
    let t = login(&api, email).await["mfaToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = second_step(&api, &t, json!({"recoveryCode": codes[0]})).await;
    assert_eq!(status, 422);
    let (status, _) = second_step(
        &api,
        &t,
        json!({"code": "123456", "recoveryCode": codes[1]}),
    )
    .await;
    assert_eq!(status, 422, "one factor at a time");

    // Five wrong codes lock the token: the sixth try is refused even with
    // a good recovery code.
    let t = login(&api, email).await["mfaToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad: Vec<String> = (0..5u64)
        .map(|i| {
            format!(
                "{:06}",
                (code_at(&secret, now + 2).parse::<u64>().unwrap() + 1 + i) % 1_000_000
            )
        })
        .collect();
    for (i, b) in bad.iter().enumerate() {
        let (status, body) = second_step(&api, &t, json!({"code": b})).await;
        let want = if i < 4 {
            (422, "wrong_code")
        } else {
            (401, "mfa_token_invalid")
        };
        assert_eq!(
            (status, body["error"]["code"].as_str().unwrap()),
            want,
            "try {}",
            i + 1
        );
    }
    let (status, body) = second_step(&api, &t, json!({"recoveryCode": codes[1]})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("mfa_token_invalid"))
    );

    // New recovery codes void the old ones.
    let (status, fresh) = api
        .call(
            Method::POST,
            "/api/account/mfa/recovery-codes",
            Some(token),
            Some(json!({"password": PW})),
        )
        .await;
    assert_eq!(status, 200, "{fresh}");
    let fresh: Vec<String> = serde_json::from_value(fresh["recoveryCodes"].clone()).unwrap();
    let t = login(&api, email).await["mfaToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = second_step(&api, &t, json!({"recoveryCode": codes[1]})).await;
    assert_eq!(status, 422);
    let (status, _) = second_step(&api, &t, json!({"recoveryCode": fresh[0]})).await;
    assert_eq!(status, 200);

    // Turning it off: the password and a code again.
    let (status, _) = api
        .call(
            Method::DELETE,
            "/api/account/mfa/totp",
            Some(token),
            Some(json!({"password": PW, "code": "12"})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, body) = api
        .call(
            Method::DELETE,
            "/api/account/mfa/totp",
            Some(token),
            Some(json!({"password": PW, "code": fresh[1]})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert!(login(&api, email).await["token"].is_string());
    let (status, body) = api
        .call(
            Method::DELETE,
            "/api/account/mfa/totp",
            Some(token),
            Some(json!({"password": PW, "code": fresh[2]})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("mfa_not_enabled"))
    );

    // The log holds each step; the outbox a notice for on and for off.
    let (_, log) = api
        .call(
            Method::GET,
            "/api/account/security-log?limit=100",
            Some(token),
            None,
        )
        .await;
    let kinds: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for k in [
        "mfa_enabled",
        "mfa_disabled",
        "recovery_code_used",
        "recovery_codes_regenerated",
        "login_failed",
        "login_succeeded",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert!(log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "login_failed" && e["detail"]["step"] == "mfa"));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE purpose IN ('mfa_enabled', 'mfa_disabled')"
        )
        .await,
        2
    );
    // No code, recovery code or secret stored in the clear.
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t, ' ') FROM (
           SELECT row_to_json(e)::text AS t FROM security_events e
           UNION ALL SELECT row_to_json(r)::text FROM recovery_codes r
           UNION ALL SELECT row_to_json(u)::text FROM users u) x",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    for c in codes
        .iter()
        .chain(&fresh)
        .chain([&next, &setup["secret"].as_str().unwrap().to_owned()])
    {
        assert!(!dump.contains(c.as_str()), "{c} is stored");
    }
}

#[tokio::test]
async fn an_account_past_its_failed_login_limit_is_refused_at_the_second_step_too() {
    let app = app().await;
    let api = Api::serve(app.clone(), "mfa-test").await;
    let email = "limited@example.com";
    let s = register(&app, email, "").await;
    let (_, setup) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp",
            Some(&s.token),
            Some(json!({"password": PW})),
        )
        .await;
    let secret = base32(setup["secret"].as_str().unwrap());
    let now = step_now();
    let (status, _) = api
        .call(
            Method::POST,
            "/api/account/mfa/totp/confirm",
            Some(&s.token),
            Some(json!({"code": code_at(&secret, now)})),
        )
        .await;
    assert_eq!(status, 200);
    let t = login(&api, email).await["mfaToken"]
        .as_str()
        .unwrap()
        .to_owned();
    // Someone else's guessing used up the account's hour meanwhile.
    sqlx::query("INSERT INTO login_failures (email) SELECT $1 FROM generate_series(1, 100)")
        .bind(email)
        .execute(&app.db)
        .await
        .unwrap();
    let (status, body) = second_step(&api, &t, json!({"code": code_at(&secret, now + 1)})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_attempts"))
    );
}
