-- 001_create_persons.sql: persons, as the seed schema (database-schema.md) writes it.
--
-- Deviations from the seed: none in this file. Notes that hold for every seed migration:
-- * gen_random_uuid() is built into PostgreSQL 13 and later; no extension is created.
-- * The seed's columns are TIMESTAMP (without time zone). The daemon sets every session's TimeZone to UTC,
--   so NOW() defaults and every value it writes are UTC wall-clock times.
-- * Each file holds an up and a down part; both are idempotent (IF [NOT] EXISTS, ON CONFLICT).

-- migrate:up
CREATE TABLE IF NOT EXISTS persons (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  username VARCHAR(255) NOT NULL,
  platform VARCHAR(50) NOT NULL DEFAULT 'chaturbate',
  role VARCHAR(20) NOT NULL DEFAULT 'UNKNOWN',
  rid INTEGER,
  did INTEGER,
  first_seen_at TIMESTAMP NOT NULL,
  last_seen_at TIMESTAMP NOT NULL,
  is_excluded BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMP DEFAULT NOW(),
  updated_at TIMESTAMP DEFAULT NOW(),
  UNIQUE(username, platform)
);

CREATE INDEX IF NOT EXISTS idx_persons_username ON persons(username);
CREATE INDEX IF NOT EXISTS idx_persons_role ON persons(role);
CREATE INDEX IF NOT EXISTS idx_persons_excluded ON persons(is_excluded);

-- migrate:down
DROP TABLE IF EXISTS persons;
