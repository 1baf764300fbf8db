-- 003_create_snapshots.sql: append-only API snapshots, as the seed schema writes it. No deviations.

-- migrate:up
CREATE TABLE IF NOT EXISTS snapshots (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  source VARCHAR(50) NOT NULL,
  captured_at TIMESTAMP NOT NULL,
  raw_payload JSONB NOT NULL,
  normalized_metrics JSONB,
  created_at TIMESTAMP DEFAULT NOW(),
  UNIQUE(person_id, source, captured_at)
);

CREATE INDEX IF NOT EXISTS idx_snapshots_person_id ON snapshots(person_id);
CREATE INDEX IF NOT EXISTS idx_snapshots_captured_at ON snapshots(captured_at DESC);
CREATE INDEX IF NOT EXISTS idx_snapshots_person_source ON snapshots(person_id, source, captured_at DESC);

-- migrate:down
DROP TABLE IF EXISTS snapshots;
