-- 010_create_ingest_tables.sql: what exactly-once ingestion needs beyond the seed.
--
-- * events: every delivered event with a valid envelope, raw, keyed by the API's own id (the idempotency key:
--   a re-delivered event hits the primary key and is skipped). Rows derived from an event are written in the
--   same transaction, and only when the event is new.
-- * ingest_cursor: the read position per broadcaster (the `i` of the next request and the timeout). Never the
--   token, never a URL: the Events API carries its token in the URL path.
-- * api_failures: every failed call of any API, URL masked.
-- * quarantined_events: events that could not be stored or mapped, raw JSON as text (NUL-safe) with a reason;
--   `fingerprint` (the event id, or a hash of the raw text) keeps a re-delivered bad event to one row.
-- * Two guards on seed tables (additions the seed is silent on; no seed column changes):
--   at most one LIVE session per broadcaster, and at most one interaction per Events API event.

-- migrate:up
CREATE TABLE IF NOT EXISTS events (
  event_id VARCHAR(64) PRIMARY KEY,
  method VARCHAR(50) NOT NULL,
  broadcaster VARCHAR(255) NOT NULL,
  event_time TIMESTAMP NOT NULL,
  received_at TIMESTAMP NOT NULL DEFAULT NOW(),
  raw JSONB NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_events_method ON events(method);
CREATE INDEX IF NOT EXISTS idx_events_event_time ON events(event_time DESC);

CREATE TABLE IF NOT EXISTS ingest_cursor (
  broadcaster VARCHAR(255) PRIMARY KEY,
  last_event_id VARCHAR(64),
  timeout_seconds INTEGER NOT NULL,
  updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS api_failures (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  api VARCHAR(50) NOT NULL,
  operation VARCHAR(100) NOT NULL,
  url TEXT NOT NULL,
  http_status INTEGER,
  error_kind VARCHAR(50) NOT NULL,
  body_excerpt TEXT,
  attempt INTEGER NOT NULL DEFAULT 1,
  occurred_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_api_failures_api_time ON api_failures(api, occurred_at DESC);

CREATE TABLE IF NOT EXISTS quarantined_events (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  fingerprint VARCHAR(64) NOT NULL UNIQUE,
  event_id VARCHAR(64),
  method VARCHAR(50),
  raw TEXT NOT NULL,
  reason TEXT NOT NULL,
  quarantined_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE UNIQUE INDEX IF NOT EXISTS uq_stream_sessions_one_live
  ON stream_sessions(broadcaster) WHERE status = 'LIVE';
CREATE UNIQUE INDEX IF NOT EXISTS uq_interactions_cb_event
  ON interactions((metadata->>'event_id')) WHERE source = 'cb_events';

-- migrate:down
DROP INDEX IF EXISTS uq_interactions_cb_event;
DROP INDEX IF EXISTS uq_stream_sessions_one_live;
DROP TABLE IF EXISTS quarantined_events;
DROP TABLE IF EXISTS api_failures;
DROP TABLE IF EXISTS ingest_cursor;
DROP TABLE IF EXISTS events;
