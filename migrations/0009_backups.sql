-- Backups of instances' state in the archive store: taken daily (and before
-- a released instance is destroyed), kept for the retention period,
-- restorable through a migration of kind 'restore'.
CREATE TABLE backups (
    id             uuid PRIMARY KEY,
    instance_id    uuid NOT NULL REFERENCES instances (id),
    -- The container whose state it is (stopped while the export runs).
    container_id   uuid NOT NULL REFERENCES containers (id),
    node_id        text NOT NULL REFERENCES nodes (id),
    kind           text NOT NULL CHECK (kind IN ('scheduled', 'manual', 'release')),
    state          text NOT NULL CHECK (state IN ('taking', 'stored', 'failed', 'expired')),
    archive_key    text NOT NULL,
    archive_sha256 text,
    archive_bytes  bigint,
    error          text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
-- One backup in progress per container.
CREATE UNIQUE INDEX backups_one_taking ON backups (container_id) WHERE state = 'taking';
CREATE INDEX backups_instance ON backups (instance_id, created_at);
CREATE INDEX backups_stored ON backups (created_at) WHERE state = 'stored';
