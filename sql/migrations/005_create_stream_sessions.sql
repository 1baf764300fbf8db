-- 005_create_stream_sessions.sql: streaming sessions, as the seed schema writes it.
--
-- Also adds interactions.stream_session_id's foreign key, which the seed declares in 004 but which can only
-- exist once this table does (see 004's header). Its name is the one PostgreSQL gives the seed's inline form.

-- migrate:up
CREATE TABLE IF NOT EXISTS stream_sessions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  platform VARCHAR(50) NOT NULL DEFAULT 'chaturbate',
  broadcaster VARCHAR(255) NOT NULL DEFAULT 'hudson_cage',
  started_at TIMESTAMP NOT NULL,
  ended_at TIMESTAMP,
  status VARCHAR(20) NOT NULL DEFAULT 'LIVE',
  created_at TIMESTAMP DEFAULT NOW(),
  updated_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_stream_sessions_status ON stream_sessions(status);
CREATE INDEX IF NOT EXISTS idx_stream_sessions_started_at ON stream_sessions(started_at DESC);
CREATE INDEX IF NOT EXISTS idx_stream_sessions_broadcaster ON stream_sessions(broadcaster);

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'interactions_stream_session_id_fkey') THEN
    ALTER TABLE interactions ADD CONSTRAINT interactions_stream_session_id_fkey
      FOREIGN KEY (stream_session_id) REFERENCES stream_sessions(id) ON DELETE SET NULL;
  END IF;
END $$;

-- migrate:down
ALTER TABLE IF EXISTS interactions DROP CONSTRAINT IF EXISTS interactions_stream_session_id_fkey;
DROP TABLE IF EXISTS stream_sessions;
