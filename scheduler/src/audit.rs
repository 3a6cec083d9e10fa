//! The audit log: who changed what, kept in the database.

/// Records one state change in the audit log. Auditing never fails the
/// operation it records; a failure is logged.
pub async fn audit<'e>(
    db: impl sqlx::PgExecutor<'e>,
    actor: &str,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) {
    let r = sqlx::query(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(detail)
    .execute(db)
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, action, subject, "audit record not written");
    }
}
