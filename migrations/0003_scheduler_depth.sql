-- Scheduler in depth: the pool's settings live in the database (both
-- schedulers read the same ones, and changing the image or generation rolls
-- the pool), claims remember their attempts, and repeated signups with one
-- Idempotency-Key get the first answer.

-- One row: what pool containers run and how many stay warm. Seeded from the
-- first scheduler's flags; changed with PUT /admin/pool.
CREATE TABLE pool_settings (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    image      text    NOT NULL,
    generation integer NOT NULL CHECK (generation > 0),
    min_idle   integer NOT NULL CHECK (min_idle >= 0),
    max_idle   integer NOT NULL CHECK (max_idle >= min_idle),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- When a pool container first became idle: the warm time feeds the target.
ALTER TABLE containers ADD COLUMN warm_at timestamptz;
CREATE INDEX containers_warm_at ON containers (warm_at) WHERE warm_at IS NOT NULL;

-- A claim the agent does not confirm in time is retried once on a fresh
-- container; a second failure marks the instance failed.
ALTER TABLE instances ADD COLUMN claim_attempts integer NOT NULL DEFAULT 1;
ALTER TABLE instances DROP CONSTRAINT instances_status_check;
ALTER TABLE instances ADD CONSTRAINT instances_status_check
    CHECK (status IN ('pending', 'ready', 'failed', 'suspended', 'deleting', 'deleted'));
ALTER TABLE instances ADD COLUMN message text NOT NULL DEFAULT '';
-- A failed instance frees its subdomain and its owner's one-instance slot.
DROP INDEX instances_subdomain_live;
DROP INDEX instances_one_per_user;
CREATE UNIQUE INDEX instances_subdomain_live ON instances (subdomain) WHERE status NOT IN ('deleted', 'failed');
CREATE UNIQUE INDEX instances_one_per_user ON instances (user_id) WHERE status NOT IN ('deleted', 'failed');
-- No container ever serves two live instances.
CREATE UNIQUE INDEX instances_container_live ON instances (container_id)
    WHERE container_id IS NOT NULL AND status NOT IN ('deleted', 'failed');
CREATE INDEX instances_created ON instances (created_at);
CREATE INDEX containers_assigning ON containers (claimed_at) WHERE state = 'assigning';

-- `Idempotency-Key` on POST /api/instances: the first answer, sealed (it
-- carries the gateway token), replayed for repeats of the same request.
CREATE TABLE idempotency_keys (
    user_id       uuid  NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key           text  NOT NULL,
    request_hash  bytea NOT NULL,
    -- NULL while the first request is in flight.
    status_code   smallint,
    response_enc  bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Other schedulers catch up on route changes by version.
CREATE INDEX routes_version ON routes (version);
