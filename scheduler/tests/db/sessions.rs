//! Sessions and the security log over the router: a customer sees each
//! session with where it came from, ends one or all, and reads failed and
//! successful sign-ins with their address, newest first, in pages.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const PW: &str = "correct-horse-battery";

async fn sign_in(api: &Api, email: &str, password: &str) -> (u16, Value) {
    api.call(
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

#[tokio::test]
async fn sessions_are_listed_ended_one_by_one_or_all_and_the_log_says_so() {
    let app = app().await;
    let api = Api::serve(app.clone(), "Firefox/1.0 (test)").await;
    let first = api.register("sessions@example.com").await;
    let (status, wrong) = sign_in(&api, "sessions@example.com", "not-the-password").await;
    assert_eq!(
        (status, wrong["error"]["code"].as_str()),
        (401, Some("bad_credentials"))
    );
    let (status, second) = sign_in(&api, "sessions@example.com", PW).await;
    assert_eq!(status, 200, "{second}");
    let second = second["token"].as_str().unwrap().to_owned();

    let (status, list) = api
        .call(Method::GET, "/api/account/sessions", Some(&first), None)
        .await;
    assert_eq!(status, 200, "{list}");
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    for s in sessions {
        assert_eq!(s["address"], "127.0.0.1", "{s}");
        assert_eq!(s["userAgent"], "Firefox/1.0 (test)", "{s}");
        assert!(
            s["createdAt"].is_string() && s["lastUsedAt"].is_string(),
            "{s}"
        );
    }
    assert_eq!(
        sessions.iter().filter(|s| s["current"] == true).count(),
        1,
        "{list}"
    );
    let other_id = sessions.iter().find(|s| s["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Another account cannot see or end this account's sessions.
    let stranger = api.register("stranger@example.com").await;
    let path = format!("/api/account/sessions/{other_id}");
    let (status, _) = api.call(Method::DELETE, &path, Some(&stranger), None).await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(
            Method::DELETE,
            "/api/account/sessions/not-a-uuid",
            Some(&first),
            None,
        )
        .await;
    assert_eq!(status, 400);

    // Ending the second session: its token stops working at once.
    let (status, _) = api.call(Method::DELETE, &path, Some(&first), None).await;
    assert_eq!(status, 204);
    let (status, _) = api
        .call(Method::GET, "/api/account/sessions", Some(&second), None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = api.call(Method::DELETE, &path, Some(&first), None).await;
    assert_eq!(status, 404, "an ended session is not found again");

    // The log: newest first, the failed sign-in with its address.
    let (status, log) = api
        .call(Method::GET, "/api/account/security-log", Some(&first), None)
        .await;
    assert_eq!(status, 200, "{log}");
    let kinds: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["session_revoked", "login_succeeded", "login_failed"]
    );
    let failed = &log["events"][2];
    assert_eq!(failed["address"], "127.0.0.1");
    assert_eq!(failed["userAgent"], "Firefox/1.0 (test)");
    assert_eq!(failed["detail"]["step"], "password");
    assert!(log["nextBefore"].is_null());
    // In pages of one.
    let (_, page) = api
        .call(
            Method::GET,
            "/api/account/security-log?limit=1",
            Some(&first),
            None,
        )
        .await;
    assert_eq!(page["events"][0]["event"], "session_revoked");
    let before = page["nextBefore"].as_i64().unwrap();
    let (_, page) = api
        .call(
            Method::GET,
            &format!("/api/account/security-log?limit=1&before={before}"),
            Some(&first),
            None,
        )
        .await;
    assert_eq!(page["events"][0]["event"], "login_succeeded");
    let (status, _) = api
        .call(
            Method::GET,
            "/api/account/security-log?limit=x",
            Some(&first),
            None,
        )
        .await;
    assert_eq!(status, 400);

    // Signing out everywhere ends this session too.
    let (_, third) = sign_in(&api, "sessions@example.com", PW).await;
    let third = third["token"].as_str().unwrap().to_owned();
    let (status, ended) = api
        .call(Method::DELETE, "/api/account/sessions", Some(&first), None)
        .await;
    assert_eq!((status, ended["sessionsEnded"].as_u64()), (200, Some(2)));
    for t in [&first, &third] {
        let (status, _) = api
            .call(Method::GET, "/api/account/sessions", Some(t), None)
            .await;
        assert_eq!(status, 401);
    }

    // Nothing secret in the log or the sessions table.
    let dump: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(t::text, ' '), '') FROM
           (SELECT row_to_json(e)::text AS t FROM security_events e
            UNION ALL SELECT row_to_json(s)::text FROM sessions s) x",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    for secret in [PW, "not-the-password", &first, &second, &third] {
        assert!(!dump.contains(secret), "{secret} is stored");
    }
}
