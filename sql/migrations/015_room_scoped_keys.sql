-- 015_room_scoped_keys.sql: event keys that cannot collide across rooms.
--
-- 010 keyed `events`, the interactions guard and the quarantine on the Events API's event id alone. Ids are
-- `<ms>-<seq>` within one room's feed, and nothing documents them as unique across rooms: with two rooms in one
-- database, the second room's event was skipped as a "duplicate" of the first's whenever their ids coincided.
-- This migration re-keys all three on (room, event id), in place, on existing data (which is unique on the id
-- alone, so also on any pair that holds it):
-- * events: primary key (broadcaster, event_id), same constraint name (the writer's repeat guard names it).
-- * interactions: the guard index becomes (room, event id). The room is metadata `broadcaster`, except for a
--   direct message, which was not sent in a room and keeps an empty `broadcaster`: its metadata now also says
--   through which room's feed it came (`room`), and existing direct messages get that key from their event.
-- * quarantined_events: a `broadcaster` column (the room whose feed delivered the item) joins the fingerprint in
--   the unique key. Existing rows get the one room of ingest_cursor when there is exactly one, else ''.
-- Like every migration here, each part runs twice harmlessly. Going down fails once two rooms share an id: the
-- old keys cannot hold both.

-- migrate:up
UPDATE interactions AS i
SET metadata = i.metadata || jsonb_build_object('room', e.broadcaster)
FROM events AS e
WHERE i.source = 'cb_events' AND i.metadata->>'broadcaster' = '' AND NOT i.metadata ? 'room'
  AND e.event_id = i.metadata->>'event_id';

ALTER TABLE quarantined_events ADD COLUMN IF NOT EXISTS broadcaster VARCHAR(255) NOT NULL DEFAULT '';
ALTER TABLE quarantined_events ALTER COLUMN broadcaster DROP DEFAULT;

DO $$
BEGIN
  IF (SELECT cardinality(conkey) FROM pg_constraint WHERE conname = 'events_pkey') = 1 THEN
    ALTER TABLE events DROP CONSTRAINT events_pkey;
    ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (broadcaster, event_id);
  END IF;
  IF pg_get_indexdef('uq_interactions_cb_event'::regclass) NOT LIKE '%room%' THEN
    DROP INDEX uq_interactions_cb_event;
    CREATE UNIQUE INDEX uq_interactions_cb_event
      ON interactions ((COALESCE(metadata->>'room', metadata->>'broadcaster')), (metadata->>'event_id'))
      WHERE source = 'cb_events';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'quarantined_events_fingerprint_key') THEN
    UPDATE quarantined_events SET broadcaster = (SELECT min(broadcaster) FROM ingest_cursor)
    WHERE (SELECT count(*) FROM ingest_cursor) = 1;
    ALTER TABLE quarantined_events DROP CONSTRAINT quarantined_events_fingerprint_key;
    ALTER TABLE quarantined_events
      ADD CONSTRAINT quarantined_events_broadcaster_fingerprint_key UNIQUE (broadcaster, fingerprint);
  END IF;
END $$;

-- migrate:down
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'quarantined_events_broadcaster_fingerprint_key') THEN
    ALTER TABLE quarantined_events DROP CONSTRAINT quarantined_events_broadcaster_fingerprint_key;
    ALTER TABLE quarantined_events ADD CONSTRAINT quarantined_events_fingerprint_key UNIQUE (fingerprint);
  END IF;
  IF pg_get_indexdef('uq_interactions_cb_event'::regclass) LIKE '%room%' THEN
    DROP INDEX uq_interactions_cb_event;
    CREATE UNIQUE INDEX uq_interactions_cb_event
      ON interactions((metadata->>'event_id')) WHERE source = 'cb_events';
  END IF;
  IF (SELECT cardinality(conkey) FROM pg_constraint WHERE conname = 'events_pkey') = 2 THEN
    ALTER TABLE events DROP CONSTRAINT events_pkey;
    ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (event_id);
  END IF;
END $$;
ALTER TABLE quarantined_events DROP COLUMN IF EXISTS broadcaster;
