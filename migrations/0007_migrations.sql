-- Moving an instance's container, with its state, to another node
-- (migration, evacuation) or back from a stored archive (restore).
-- The target container is 'migrating' until the switch; the source keeps
-- its state until the target is confirmed.
ALTER TABLE containers DROP CONSTRAINT containers_state_check;
ALTER TABLE containers ADD CONSTRAINT containers_state_check
    CHECK (state IN ('creating', 'warming', 'idle', 'assigning', 'assigned', 'migrating',
                     'failed', 'suspended', 'destroying', 'destroyed'));

CREATE TABLE migrations (
    id               uuid PRIMARY KEY,
    instance_id      uuid NOT NULL REFERENCES instances (id),
    kind             text NOT NULL CHECK (kind IN ('migrate', 'evacuate', 'restore')),
    state            text NOT NULL
                     CHECK (state IN ('exporting', 'importing', 'done', 'rolled_back')),
    source_node      text NOT NULL REFERENCES nodes (id),
    source_container uuid NOT NULL REFERENCES containers (id),
    target_node      text NOT NULL REFERENCES nodes (id),
    target_container uuid NOT NULL REFERENCES containers (id),
    -- Object key of the archive; its digest and size once it is stored.
    archive_key      text NOT NULL,
    archive_sha256   text,
    archive_bytes    bigint,
    error            text NOT NULL DEFAULT '',
    requested_by     text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- When the current state began: its timeout runs from here.
    state_since      timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    -- [{state, at}] in order: each step with when it began.
    steps            jsonb NOT NULL DEFAULT '[]'::jsonb
);
-- One live migration per instance: a second request conflicts (409).
CREATE UNIQUE INDEX migrations_one_live ON migrations (instance_id)
    WHERE state NOT IN ('done', 'rolled_back');
CREATE INDEX migrations_live ON migrations (created_at)
    WHERE state NOT IN ('done', 'rolled_back');
CREATE INDEX migrations_source ON migrations (source_container);
CREATE INDEX migrations_target ON migrations (target_container);
