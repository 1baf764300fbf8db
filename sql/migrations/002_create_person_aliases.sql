-- 002_create_person_aliases.sql: username history, as the seed schema writes it. No deviations.

-- migrate:up
CREATE TABLE IF NOT EXISTS person_aliases (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  alias VARCHAR(255) NOT NULL,
  platform VARCHAR(50) NOT NULL DEFAULT 'chaturbate',
  valid_from TIMESTAMP NOT NULL DEFAULT NOW(),
  valid_to TIMESTAMP,
  created_at TIMESTAMP DEFAULT NOW(),
  UNIQUE(alias, platform, valid_from)
);

CREATE INDEX IF NOT EXISTS idx_person_aliases_person_id ON person_aliases(person_id);
CREATE INDEX IF NOT EXISTS idx_person_aliases_alias ON person_aliases(alias);
CREATE INDEX IF NOT EXISTS idx_person_aliases_current ON person_aliases(valid_to) WHERE valid_to IS NULL;

-- migrate:down
DROP TABLE IF EXISTS person_aliases;
