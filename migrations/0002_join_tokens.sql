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

-- What the node's last heartbeat said about the host.
ALTER TABLE nodes
    ADD COLUMN cpu_busy_permille      integer NOT NULL DEFAULT 0,
    ADD COLUMN memory_available_bytes bigint  NOT NULL DEFAULT 0,
    ADD COLUMN disk_available_bytes   bigint  NOT NULL DEFAULT 0,
    ADD COLUMN disk_total_bytes       bigint  NOT NULL DEFAULT 0,
    ADD COLUMN containers_running     integer NOT NULL DEFAULT 0;

-- A container's address can change (Docker restarted it); its routes follow.
CREATE INDEX routes_container ON routes (container_id);
