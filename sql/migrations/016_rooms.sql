-- 016_rooms.sql: the rooms a daemon captures, as rows (issue 11).
--
-- The seed has one broadcaster, named in the daemon's settings. A studio runs many rooms from one place: each
-- is a row here, added, disabled and enabled with `mhc-daemon rooms`. Only the name and whether to capture it
-- live here; a room's tokens never do (they are files, see the README). A daemon polls the enabled rooms it
-- holds an Events API token for. Disabling a room stops its capture and keeps everything captured so far.

-- migrate:up
CREATE TABLE IF NOT EXISTS rooms (
  name VARCHAR(255) PRIMARY KEY,
  enabled BOOLEAN NOT NULL DEFAULT true,
  added_at TIMESTAMP NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);

-- migrate:down
DROP TABLE IF EXISTS rooms;
