-- Releasing an instance (DELETE /api/instances/me): its route goes first,
-- its container is stopped with its volume kept, and the instance waits in
-- 'deleting' (holding its subdomain) until the grace period ends.
ALTER TABLE instances ADD COLUMN released_at timestamptz;

-- A released route stays as a tombstone with its own version, so that every
-- scheduler (and every edge catching up) learns of the removal in order.
ALTER TABLE routes ADD COLUMN removed_at timestamptz;
