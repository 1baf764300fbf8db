-- 008_create_watchlist_members.sql: watchlist membership, as the seed schema writes it. No deviations.

-- migrate:up
CREATE TABLE IF NOT EXISTS watchlist_members (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  watchlist_id UUID NOT NULL REFERENCES watchlists(id) ON DELETE CASCADE,
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  added_at TIMESTAMP DEFAULT NOW(),
  UNIQUE(watchlist_id, person_id)
);

CREATE INDEX IF NOT EXISTS idx_watchlist_members_watchlist_id ON watchlist_members(watchlist_id);
CREATE INDEX IF NOT EXISTS idx_watchlist_members_person_id ON watchlist_members(person_id);

-- migrate:down
DROP TABLE IF EXISTS watchlist_members;
