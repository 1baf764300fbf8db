-- 006_create_attributes.sql: tags and memory attached to persons, as the seed schema writes it. No deviations.

-- migrate:up
CREATE TABLE IF NOT EXISTS attributes (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  key VARCHAR(255) NOT NULL,
  value TEXT NOT NULL,
  confidence VARCHAR(20) NOT NULL,
  evidence_type VARCHAR(50),
  evidence_id UUID,
  created_at TIMESTAMP DEFAULT NOW(),
  updated_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_attributes_person_id ON attributes(person_id);
CREATE INDEX IF NOT EXISTS idx_attributes_key ON attributes(key);

-- migrate:down
DROP TABLE IF EXISTS attributes;
