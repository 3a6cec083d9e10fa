-- ClawDeploy first schema: nodes, pool containers, customers and their
-- instances, encrypted secrets, edge routes and the audit log.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Bearer tokens; only their SHA-256 is stored.
CREATE TABLE sessions (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE nodes (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    public_address  text NOT NULL DEFAULT '',
    private_address text NOT NULL DEFAULT '',
    cpu_millis      integer NOT NULL DEFAULT 0,
    memory_bytes    bigint NOT NULL DEFAULT 0,
    max_containers  integer NOT NULL DEFAULT 20,
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'draining', 'unreachable', 'removed')),
    last_heartbeat  timestamptz,
    -- Desired-state generation: bumped in the same transaction as any change
    -- to what should run on the node.
    generation      bigint NOT NULL DEFAULT 1,
    cert_serial     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE containers (
    id                uuid PRIMARY KEY,
    node_id           text NOT NULL REFERENCES nodes (id),
    docker_id         text NOT NULL DEFAULT '',
    upstream          text NOT NULL DEFAULT '',
    image             text NOT NULL,
    pool_generation   integer NOT NULL DEFAULT 1,
    gateway_token_enc bytea NOT NULL,
    state             text NOT NULL
                      CHECK (state IN ('creating', 'warming', 'idle', 'assigning', 'assigned',
                                       'failed', 'suspended', 'destroying', 'destroyed')),
    cpu_millis        integer NOT NULL,
    memory_bytes      bigint NOT NULL,
    pids              integer NOT NULL,
    -- Tenant config version an authenticated probe saw live.
    applied_config    bigint NOT NULL DEFAULT 0,
    message           text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    claimed_at        timestamptz
);
CREATE INDEX containers_idle ON containers (created_at) WHERE state = 'idle';
CREATE INDEX containers_node_live ON containers (node_id)
    WHERE state NOT IN ('destroyed', 'failed');

CREATE TABLE instances (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id),
    subdomain      text NOT NULL,
    container_id   uuid REFERENCES containers (id),
    tier           text NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'team')),
    status         text NOT NULL
                   CHECK (status IN ('pending', 'ready', 'suspended', 'deleting', 'deleted')),
    config_version bigint NOT NULL DEFAULT 1,
    default_model  text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    ready_at       timestamptz
);
CREATE UNIQUE INDEX instances_subdomain_live ON instances (subdomain) WHERE status <> 'deleted';
CREATE UNIQUE INDEX instances_one_per_user ON instances (user_id) WHERE status <> 'deleted';
CREATE INDEX instances_container ON instances (container_id);

-- Customer secrets (provider API keys), AES-256-GCM; the associated data
-- binds the instance and the field name.
CREATE TABLE secrets (
    instance_id uuid NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    name        text NOT NULL,
    ciphertext  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, name)
);

-- Route versions are global so an edge can order every change.
CREATE SEQUENCE route_version;
CREATE TABLE routes (
    hostname     text PRIMARY KEY,
    instance_id  uuid NOT NULL REFERENCES instances (id),
    container_id uuid NOT NULL REFERENCES containers (id),
    upstream     text NOT NULL,
    version      bigint NOT NULL
);

CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    subject text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'::jsonb
);
