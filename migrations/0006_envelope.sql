-- Envelope encryption of customers' provider keys: each instance has its own
-- data key (AES-256), stored only wrapped by the key-encryption key that
-- lives outside the database; `kek_id` names which one.
CREATE TABLE tenant_keys (
    instance_id uuid PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    kek_id      text NOT NULL,
    wrapped_dek bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
