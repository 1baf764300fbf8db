-- 013_ingest_gaps.sql: holes in the captured feed, never silent.
--
-- * ingest_gaps: one row per stretch of the Events API feed the read position moved over without its events
--   having been delivered (a continuation that resumes minutes past the position asked for, say). The rule
--   that tells a gap from idling is ingest.find_gap. A row is written in the transaction that moves the
--   cursor past the gap, so a crash can neither lose it nor, with the unique key, write it twice (a page
--   stored again from the spool adds nothing).
--   after_event_id: the last position whose events were delivered; resumed_event_id: where reading resumed;
--   gap_from / gap_to: the server times those two ids encode (naive UTC, like every TIMESTAMP here).

-- migrate:up
CREATE TABLE IF NOT EXISTS ingest_gaps (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  broadcaster VARCHAR(255) NOT NULL,
  after_event_id VARCHAR(64) NOT NULL,
  resumed_event_id VARCHAR(64) NOT NULL,
  gap_from TIMESTAMP NOT NULL,
  gap_to TIMESTAMP NOT NULL,
  reason VARCHAR(50) NOT NULL,
  detected_at TIMESTAMP NOT NULL DEFAULT NOW(),
  UNIQUE (broadcaster, after_event_id, resumed_event_id)
);

CREATE INDEX IF NOT EXISTS idx_ingest_gaps_detected_at ON ingest_gaps(detected_at DESC);

-- migrate:down
DROP TABLE IF EXISTS ingest_gaps;
