-- One-time tokens an operator hands to a new node. Only a hash of the
-- secret is kept; a token is spent by the join that uses it.
CREATE TABLE join_tokens (
    id          text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    node_id     text NOT NULL,
    created_by  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX join_tokens_node ON join_tokens (node_id);

ALTER TABLE nodes ADD COLUMN cert_not_after timestamptz;
