-- Every signup asks whether its subdomain is cooling down (released by
-- another account within the cool-down). The live-subdomain index leaves
-- released instances out, so that question scanned every instance.
CREATE INDEX instances_released_subdomain ON instances (subdomain, released_at)
    WHERE status = 'deleted';
