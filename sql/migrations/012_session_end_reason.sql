-- 012_session_end_reason.sql: why a stream session ended.
--
-- The seed's stream_sessions has LIVE/ENDED and an ended_at, and is silent on why a session ended. Issue 10's
-- session rules end sessions for four reasons, and a reader of a show's record must be able to tell a show the
-- broadcaster stopped from one the daemon closed on its own:
-- * broadcast_stop: a broadcastStop event ended it (ended_at is the stop's time);
-- * next_start: the next show's broadcastStart came while it was still open (the stop never arrived); it ends
--   at its last event;
-- * stale: no event for MHC_SESSION_STALE_MINUTES while the Stats API said the room was offline (or twice that
--   without a Stats report); it ends at its last event;
-- * repair: `mhc-daemon sessions repair` kept an end written by an earlier version that no event explains.
-- NULL while LIVE. Rows ended by earlier versions keep NULL ("not recorded") until `sessions repair` runs.
-- The seed's status values stay as they are. A session's last event is not a column: it is the newest
-- interaction linked to it, read only when a rule needs it (a start while LIVE, the staleness check), so the
-- writer's hot path does no extra update per batch.

-- migrate:up
ALTER TABLE stream_sessions ADD COLUMN IF NOT EXISTS end_reason TEXT;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'stream_sessions_end_reason_check') THEN
    ALTER TABLE stream_sessions ADD CONSTRAINT stream_sessions_end_reason_check CHECK (
      end_reason IN ('broadcast_stop', 'next_start', 'stale', 'repair')
      AND status = 'ENDED'
      OR end_reason IS NULL
    );
  END IF;
END $$;

-- migrate:down
ALTER TABLE stream_sessions DROP CONSTRAINT IF EXISTS stream_sessions_end_reason_check;
ALTER TABLE stream_sessions DROP COLUMN IF EXISTS end_reason;
