-- An instance suspended for its account (its owner's address unproven past
-- the grace: `suspended_reason = 'email_unverified'`) keeps its container
-- stopped with its state, and its routes: the edges answer them
-- themselves, saying why (`routes.paused`), until it resumes.
ALTER TABLE instances ADD COLUMN suspended_reason text;
ALTER TABLE routes ADD COLUMN paused text NOT NULL DEFAULT '';
