//! The HTTP router in-process: bad requests get JSON errors.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn bad_requests_get_json_errors_from_the_router_in_process() {
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let base = serve(app.clone()).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let reg: Value = http
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": "ok@example.com", "password": "correct-horse-battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = reg["token"].as_str().unwrap().to_owned();
    let post = |path: &str| http.post(format!("{base}{path}"));
    let get = |path: &str| http.get(format!("{base}{path}"));
    let pw = "correct-horse-battery";
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            post("/api/auth/register")
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "bad_request",
        ),
        (
            post("/api/auth/register")
                .json(&json!({"email": "a@b.co", "password": pw, "extra": 1})),
            400,
            "bad_request",
        ),
        (
            post("/api/auth/register").json(&json!({"email": "nope", "password": pw})),
            422,
            "invalid_field",
        ),
        (
            post("/api/auth/register")
                .json(&json!({"email": "weak@example.com", "password": "short"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/auth/register").json(&json!({"email": "OK@example.com", "password": pw})),
            409,
            "email_taken",
        ),
        (
            post("/api/auth/login")
                .json(&json!({"email": "ok@example.com", "password": "wrong-password-here"})),
            401,
            "bad_credentials",
        ),
        (
            post("/api/auth/login")
                .json(&json!({"email": "nobody@example.com", "password": "wrong-password-here"})),
            401,
            "bad_credentials",
        ),
        (
            post("/api/instances").json(&json!({})),
            401,
            "unauthenticated",
        ),
        (
            post("/api/instances")
                .bearer_auth("cdt_forged")
                .json(&json!({})),
            401,
            "unauthenticated",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "www"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": 7})),
            400,
            "bad_request",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "ok-name", "unexpected": 1})),
            400,
            "bad_request",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "Bad_Name!"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "-abc"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "ok-name", "apiKeys": {"evil": "x"}})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .header("Idempotency-Key", "x".repeat(300))
                .json(&json!({})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("x".repeat(70 * 1024)),
            413,
            "too_large",
        ),
        (
            http.patch(format!("{base}/api/instances/me"))
                .bearer_auth(&token)
                .json(&json!({})),
            400,
            "bad_request",
        ),
        (
            get("/api/instances/me").bearer_auth(&token),
            404,
            "not_found",
        ),
        (
            get("/api/instances/not-a-uuid").bearer_auth(&token),
            404,
            "not_found",
        ),
        (get("/api/subdomains/a_b"), 422, "invalid_field"),
        (get("/admin/nodes"), 401, "unauthenticated"),
        (
            get("/admin/nodes").bearer_auth("wrong"),
            401,
            "unauthenticated",
        ),
        (
            post("/admin/nodes/none/drain").bearer_auth("admin-token"),
            404,
            "not_found",
        ),
        (
            http.put(format!("{base}/admin/pool"))
                .bearer_auth("admin-token")
                .json(&json!({"minIdle": 30, "maxIdle": 2})),
            422,
            "invalid_field",
        ),
        (get("/no/such/route"), 404, "not_found"),
        (
            http.delete(format!("{base}/healthz")),
            405,
            "method_not_allowed",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "case {i}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "case {i}: {body}");
    }
    // Nothing was created by the refused requests, and the pool is whole.
    assert_eq!(count(&app, "SELECT count(*) FROM users").await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM instances").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM secrets").await, 0);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM containers WHERE state IN ('assigning', 'assigned')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM containers WHERE state = 'idle'").await,
        2
    );
    // The operator's answers are their views.
    let admin = |path: &str| http.get(format!("{base}{path}")).bearer_auth("admin-token");
    let nodes: Value = admin("/admin/nodes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n = &nodes["nodes"][0];
    assert_eq!(n["id"], "n1");
    assert_eq!(n["idle"], 2);
    assert_eq!(n["state"], "active");
    // The product spec's shape, next to the richer fields.
    assert_eq!(n["status"], "healthy");
    assert_eq!(n["ip"], "10.1.2.3");
    assert_eq!(
        n["containers"],
        json!({"total": 2, "idle": 2, "assigned": 0})
    );
    let pool: Value = admin("/admin/pool")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pool["settings"]["minIdle"], 5);
    assert_eq!(pool["containers"][0]["state"], "idle");
    assert_eq!(pool["containers"][0]["count"], 2);
}
