-- A signup that found every node full waits in line ('queued', no
-- container yet) and is assigned in arrival order as capacity appears.
ALTER TABLE instances DROP CONSTRAINT instances_status_check;
ALTER TABLE instances ADD CONSTRAINT instances_status_check
    CHECK (status IN ('queued', 'pending', 'ready', 'failed', 'suspended', 'deleting', 'deleted'));
CREATE INDEX instances_queued ON instances (created_at) WHERE status = 'queued';
