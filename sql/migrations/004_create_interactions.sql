-- 004_create_interactions.sql: append-only interactions.
--
-- Deviation from the seed: the seed declares `stream_session_id UUID REFERENCES stream_sessions(id)` here, but
-- stream_sessions is created by 005, so this file could never run in the seed's order. The smallest sound change:
-- the column is created here without its foreign key, and 005 adds that same foreign key (same name, same
-- ON DELETE SET NULL) right after creating stream_sessions. Once 005 has run the schema equals the seed's.

-- migrate:up
CREATE TABLE IF NOT EXISTS interactions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  stream_session_id UUID,
  type VARCHAR(50) NOT NULL,
  content TEXT NOT NULL,
  timestamp TIMESTAMP NOT NULL,
  source VARCHAR(50) NOT NULL,
  metadata JSONB,
  created_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_interactions_person_id ON interactions(person_id);
CREATE INDEX IF NOT EXISTS idx_interactions_timestamp ON interactions(timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_interactions_session_id ON interactions(stream_session_id);
CREATE INDEX IF NOT EXISTS idx_interactions_type ON interactions(type);

-- migrate:down
DROP TABLE IF EXISTS interactions;
