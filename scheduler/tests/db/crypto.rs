//! Envelope encryption: rotating the key-encryption key.

use clawdeploy_scheduler::crypto::{aad, envelope, SecretBox};

use crate::support::*;

#[tokio::test]
async fn a_kek_rotation_rewraps_data_keys_and_leaves_customer_ciphertext_alone() {
    let app = app().await;
    let instance = instance(&app, "kek", None).await;
    let mut conn = app.db.acquire().await.unwrap();
    let dek = envelope::create(&app.secrets, &mut conn, instance)
        .await
        .unwrap();
    let sealed = dek
        .seal(&aad::secret(instance, "openai"), b"sk-secret")
        .unwrap();
    drop(conn);
    // A custom domain's certificate key and the ACME account, sealed
    // directly under the KEK.
    let key_aad = aad::domain_key(instance, "kek.example.org");
    sqlx::query(
        "INSERT INTO domains (hostname, instance_id, user_id, token, state, key_sealed)
         SELECT 'kek.example.org', id, user_id, 't', 'active', $2 FROM instances WHERE id = $1",
    )
    .bind(instance)
    .bind(app.secrets.seal(&key_aad, b"-----key-----").unwrap())
    .execute(&app.db)
    .await
    .unwrap();
    let acct_aad = aad::acme_account("https://ca.test/dir");
    sqlx::query("INSERT INTO acme_accounts (directory_url, credentials_sealed) VALUES ($1, $2)")
        .bind("https://ca.test/dir")
        .bind(app.secrets.seal(&acct_aad, b"{}").unwrap())
        .execute(&app.db)
        .await
        .unwrap();
    // An account's TOTP secret.
    let owner: uuid::Uuid = sqlx::query_scalar("SELECT user_id FROM instances WHERE id = $1")
        .bind(instance)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let totp_aad = aad::totp_secret(owner);
    sqlx::query("UPDATE users SET totp_secret_enc = $2 WHERE id = $1")
        .bind(owner)
        .bind(
            app.secrets
                .seal(&totp_aad, b"twenty-bytes-secret!")
                .unwrap(),
        )
        .execute(&app.db)
        .await
        .unwrap();
    let new = SecretBox::from_hex(&SecretBox::generate_key_hex()).unwrap();
    let done = envelope::rotate(&app.db, &app.secrets, &new).await.unwrap();
    assert_eq!(done.data_keys, 1);
    assert_eq!(done.certificate_keys, 2);
    assert_eq!(done.totp_secrets, 1);
    let totp: Vec<u8> = sqlx::query_scalar("SELECT totp_secret_enc FROM users WHERE id = $1")
        .bind(owner)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(new.open(&totp_aad, &totp).unwrap(), b"twenty-bytes-secret!");
    let key: Vec<u8> = sqlx::query_scalar("SELECT key_sealed FROM domains")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(new.open(&key_aad, &key).unwrap(), b"-----key-----");
    let acct: Vec<u8> = sqlx::query_scalar("SELECT credentials_sealed FROM acme_accounts")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(new.open(&acct_aad, &acct).unwrap(), b"{}");
    let kek_id: String =
        sqlx::query_scalar("SELECT kek_id FROM tenant_keys WHERE instance_id = $1")
            .bind(instance)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(kek_id, new.id());
    let mut conn = app.db.acquire().await.unwrap();
    // The data key opens under the new KEK only; what it sealed is
    // unchanged and still opens.
    let rewrapped = envelope::load_one(&new, &mut conn, instance).await.unwrap();
    assert_eq!(
        rewrapped
            .open(&aad::secret(instance, "openai"), &sealed)
            .unwrap(),
        b"sk-secret"
    );
    assert!(envelope::load_one(&app.secrets, &mut conn, instance)
        .await
        .is_err());
    drop(conn);
    // A rerun changes nothing.
    let again = envelope::rotate(&app.db, &app.secrets, &new).await.unwrap();
    assert_eq!(
        (again.data_keys, again.certificate_keys, again.totp_secrets),
        (0, 0, 0)
    );
}
