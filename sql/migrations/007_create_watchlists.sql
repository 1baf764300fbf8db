-- 007_create_watchlists.sql: system-defined lists, as the seed schema writes it.
--
-- Deviation from the seed: the seed puts the five seed rows in this table's block; they are inserted by 009,
-- which its own migration plan reserves for them.

-- migrate:up
CREATE TABLE IF NOT EXISTS watchlists (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name VARCHAR(100) NOT NULL UNIQUE,
  description TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

-- migrate:down
DROP TABLE IF EXISTS watchlists;
