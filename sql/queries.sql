-- Runtime queries of db.py, one block per `-- name:` header. Parameters are always bound ($1, $2, ...).

-- name: find_person
-- A person by current name: a current alias wins over the original username (a rename moved the name on).
SELECT p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at, p.is_excluded
FROM persons p
LEFT JOIN person_aliases a
  ON a.person_id = p.id AND a.alias = $1 AND a.platform = $2 AND a.valid_to IS NULL
WHERE p.platform = $2 AND (p.username = $1 OR a.id IS NOT NULL)
ORDER BY (a.id IS NOT NULL) DESC
LIMIT 1;

-- name: add_to_watchlist
INSERT INTO watchlist_members (watchlist_id, person_id)
SELECT w.id, $2 FROM watchlists w WHERE w.name = $1
ON CONFLICT (watchlist_id, person_id) DO NOTHING;

-- name: ping
SELECT 1;

-- name: record_api_failure
INSERT INTO api_failures (api, operation, url, http_status, error_kind, body_excerpt, attempt, occurred_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: recent_api_failures
SELECT api, operation, url, http_status, error_kind, body_excerpt, attempt, occurred_at
FROM api_failures ORDER BY occurred_at DESC LIMIT $1;

-- name: load_cursor
SELECT broadcaster, last_event_id, timeout_seconds FROM ingest_cursor WHERE broadcaster = $1;

-- name: move_cursors
-- The read position of each room ($1, one entry each, sorted) after its responses in this transaction. A
-- response without a next id (nextUrl null) keeps the last committed position rather than forgetting it.
INSERT INTO ingest_cursor AS c (broadcaster, last_event_id, timeout_seconds, updated_at)
SELECT m.room, m.position, $3, NOW() FROM unnest($1::text[], $2::text[]) AS m(room, position)
ON CONFLICT (broadcaster) DO UPDATE SET
  last_event_id = COALESCE(EXCLUDED.last_event_id, c.last_event_id),
  timeout_seconds = EXCLUDED.timeout_seconds,
  updated_at = NOW();

-- name: insert_new_events
-- The raw events of one or more consecutive responses, each with its receipt time ($5), on the fast path:
-- no conflict handling, so an event already stored (or repeated in the batch) fails the statement on the
-- primary key and the writer redoes the transaction with insert_events.
INSERT INTO events (event_id, method, broadcaster, event_time, received_at, raw)
SELECT e.event_id, e.method, e.broadcaster, e.event_time, e.received_at, e.raw::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamp[], $5::timestamp[], $6::text[])
  AS e(event_id, method, broadcaster, event_time, received_at, raw);

-- name: insert_events
-- The same, guarded: the primary key (room, event id) is the idempotency point, a re-delivered event is not
-- inserted and not returned.
INSERT INTO events (event_id, method, broadcaster, event_time, received_at, raw)
SELECT e.event_id, e.method, e.broadcaster, e.event_time, e.received_at, e.raw::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamp[], $5::timestamp[], $6::text[])
  AS e(event_id, method, broadcaster, event_time, received_at, raw)
ON CONFLICT (broadcaster, event_id) DO NOTHING
RETURNING broadcaster, event_id;

-- name: resolve_aliases
-- Names that are a current alias belong to the aliased person (the newest alias wins, as in find_person).
-- Kept flat, the caller picks the newest: a DISTINCT ON form ran ten times slower once PostgreSQL settled on a
-- generic plan made while the tables were small.
SELECT a.alias AS name, a.person_id AS id, a.valid_from AS at
FROM person_aliases a
WHERE a.alias = ANY($1::text[]) AND a.platform = $2 AND a.valid_to IS NULL;

-- name: touch_persons
-- Person bookkeeping for persons found by alias: last_seen_at only moves forward and first_seen_at only
-- back (an old recording replayed), roles widen (VIEWER + MODEL = BOTH). The same rule as upsert_persons and
-- db.widen_role.
UPDATE persons AS p SET
  first_seen_at = LEAST(p.first_seen_at, t.first_seen),
  last_seen_at = GREATEST(p.last_seen_at, t.seen),
  role = CASE
    WHEN p.role = t.role OR t.role = 'UNKNOWN' THEN p.role
    WHEN p.role = 'UNKNOWN' THEN t.role
    ELSE 'BOTH'
  END,
  updated_at = CASE
    WHEN t.seen > p.last_seen_at OR t.first_seen < p.first_seen_at OR p.role IS DISTINCT FROM t.role
    THEN NOW()
    ELSE p.updated_at
  END
FROM unnest($1::uuid[], $2::timestamp[], $3::text[], $4::timestamp[]) AS t(id, seen, role, first_seen)
WHERE p.id = t.id
RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at, p.is_excluded;

-- name: upsert_persons
-- Creates each named person, or moves last_seen_at forward, first_seen_at back (older events that arrive
-- later) and widens the role (VIEWER + MODEL = BOTH, as db.widen_role). A person created under an excluded name ($6) starts excluded and joins the Excluded
-- watchlist ($7). $5 is the platform.
WITH upserted AS (
  INSERT INTO persons AS p (username, platform, role, first_seen_at, last_seen_at, is_excluded)
  SELECT u.name, $5, u.role, u.first_seen, u.last_seen, u.name = ANY($6::text[])
  FROM unnest($1::text[], $2::text[], $3::timestamp[], $4::timestamp[]) AS u(name, role, first_seen, last_seen)
  ORDER BY u.name
  ON CONFLICT (username, platform) DO UPDATE SET
    first_seen_at = LEAST(p.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(p.last_seen_at, EXCLUDED.last_seen_at),
    role = CASE
      WHEN p.role = EXCLUDED.role OR EXCLUDED.role = 'UNKNOWN' THEN p.role
      WHEN p.role = 'UNKNOWN' THEN EXCLUDED.role
      ELSE 'BOTH'
    END,
    updated_at = CASE
      WHEN EXCLUDED.last_seen_at > p.last_seen_at OR EXCLUDED.first_seen_at < p.first_seen_at
        OR p.role IS DISTINCT FROM EXCLUDED.role THEN NOW()
      ELSE p.updated_at
    END
  RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at,
    p.is_excluded, (xmax = 0) AS inserted
), listed AS (
  INSERT INTO watchlist_members (watchlist_id, person_id)
  SELECT w.id, u.id FROM upserted u JOIN watchlists w ON w.name = $7
  WHERE u.inserted AND u.is_excluded
  ON CONFLICT (watchlist_id, person_id) DO NOTHING
)
SELECT * FROM upserted;

-- name: end_sessions
-- Sessions the session rules end ($1 ids, $2 times, $3 reasons). Only a LIVE row is ended: a row another
-- writer (the staleness task, a repair) ended meanwhile keeps its end.
UPDATE stream_sessions AS s SET status = 'ENDED', ended_at = e.ended_at, end_reason = e.reason, updated_at = NOW()
FROM unnest($1::uuid[], $2::timestamp[], $3::text[]) AS e(id, ended_at, reason)
WHERE s.id = e.id AND s.status = 'LIVE';

-- name: insert_sessions
INSERT INTO stream_sessions (id, platform, broadcaster, started_at, ended_at, status, end_reason)
SELECT s.id, $1, s.broadcaster, s.started_at, s.ended_at,
  CASE WHEN s.ended_at IS NULL THEN 'LIVE' ELSE 'ENDED' END, s.reason
FROM unnest($2::uuid[], $3::text[], $4::timestamp[], $5::timestamp[], $6::text[])
  AS s(id, broadcaster, started_at, ended_at, reason);

-- name: insert_new_interactions
-- The rows of events new in this transaction, on the fast path (see insert_new_events): a second row for an
-- event fails on the guard index uq_interactions_cb_event and the writer redoes the transaction guarded.
INSERT INTO interactions (person_id, stream_session_id, type, content, timestamp, source, metadata)
SELECT i.person_id, i.session_id, i.type, i.content, i.at, $1, i.metadata::jsonb
FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamp[], $7::text[])
  AS i(person_id, session_id, type, content, at, metadata);

-- name: insert_interactions
-- The same, guarded: the guard index makes a repeat a no-op, never a second row (for instance when an events
-- row was deleted by hand and its event is delivered again).
INSERT INTO interactions (person_id, stream_session_id, type, content, timestamp, source, metadata)
SELECT i.person_id, i.session_id, i.type, i.content, i.at, $1, i.metadata::jsonb
FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamp[], $7::text[])
  AS i(person_id, session_id, type, content, at, metadata)
ON CONFLICT ((COALESCE(metadata->>'room', metadata->>'broadcaster')), (metadata->>'event_id'))
  WHERE source = 'cb_events' DO NOTHING;

-- name: insert_gaps
-- Holes the read position moved over (ingest.find_gap), in the transaction of the cursor move; a page stored
-- twice (from memory and from the spool) records its gap once.
INSERT INTO ingest_gaps (broadcaster, after_event_id, resumed_event_id, gap_from, gap_to, reason, detected_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamp[], $5::timestamp[], $6::text[],
  $7::timestamp[])
ON CONFLICT (broadcaster, after_event_id, resumed_event_id) DO NOTHING
RETURNING broadcaster, after_event_id, resumed_event_id;

-- name: ingest_gaps
-- The newest gaps first ($1 rows at most), of room $2 (NULL: every room).
SELECT broadcaster, after_event_id, resumed_event_id, gap_from, gap_to, reason, detected_at
FROM ingest_gaps WHERE $2::text IS NULL OR broadcaster = $2
ORDER BY detected_at DESC, gap_from DESC LIMIT $1;

-- name: insert_quarantined
-- A fingerprint is unique within one room's feed ($1: the room).
INSERT INTO quarantined_events (broadcaster, fingerprint, event_id, method, raw, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (broadcaster, fingerprint) DO NOTHING
RETURNING broadcaster;

-- name: batch_context
-- What the events writer must know before it writes a batch's rows, in one round trip: the current aliases
-- among its names ($1, platform $2; kind 'alias', like resolve_aliases) and the sessions of its rooms ($3) the
-- session rules need (kind 'session', name = broadcaster, at = started_at): the LIVE ones, those whose span
-- overlaps the batch's times [$4, $5], and the first one starting after them (so a replayed old start knows a
-- later show exists). `last_at`, a LIVE session's newest linked event, is read only when the batch holds a
-- broadcastStart ($6): it scans the session's interactions, and only a start while LIVE needs it.
SELECT 'alias' AS kind, a.alias AS name, a.person_id AS id, a.valid_from AS at,
  NULL::timestamp AS ended_at, NULL::timestamp AS last_at
FROM person_aliases a
WHERE a.alias = ANY($1::text[]) AND a.platform = $2 AND a.valid_to IS NULL
UNION ALL
SELECT 'session', s.broadcaster, s.id, s.started_at, s.ended_at,
  CASE WHEN $6 AND s.status = 'LIVE' THEN
    (SELECT max(i.timestamp) FROM interactions i WHERE i.stream_session_id = s.id)
  END
FROM stream_sessions s
WHERE s.broadcaster = ANY($3::text[]) AND (
  s.status = 'LIVE'
  OR (s.started_at <= $5 AND s.ended_at >= $4)
  OR (s.started_at > $5 AND NOT EXISTS (
    SELECT 1 FROM stream_sessions n
    WHERE n.broadcaster = s.broadcaster AND n.started_at > $5 AND n.started_at < s.started_at
  ))
);
-- ---------------------------------------------------------------------------------------------------------------
-- Snapshots (issue 4): scheduling, identity (did/rid, renames), deltas and the exclusion-aware read side.

-- name: newest_snapshot_at
SELECT max(captured_at) FROM snapshots WHERE person_id = $1 AND source = $2;

-- name: newest_snapshot_miss_at
SELECT missed_at FROM snapshot_misses WHERE person_id = $1 AND source = $2;

-- name: newest_api_failure_at
SELECT max(occurred_at) FROM api_failures WHERE api = $1 AND error_kind = ANY($2::text[]);

-- name: due_member_lookups
-- Persons seen in events or on a watchlist whose newest member snapshot is older than $3 (or absent), skipping
-- excluded persons, the broadcaster ($2) and every room's, names the API did not know since $4 and names now
-- resolving to another person. A snapshot or miss stamped after $6 (now) was written while the wall clock ran
-- ahead: it does not count, so no clock jump can hold a lookup back. Tippers first, then people who messaged,
-- then watchlist members, then the rest; never-snapshotted before stale within a rank.
WITH reasons AS (
  SELECT i.person_id,
    bool_or(i.type = 'TIP_EVENT') AS tipped,
    bool_or(i.type IN ('CHAT_MESSAGE', 'PRIVATE_MESSAGE')) AS messaged,
    false AS watched
  FROM interactions i GROUP BY i.person_id
  UNION ALL
  SELECT DISTINCT m.person_id, false, false, true FROM watchlist_members m
), candidates AS (
  SELECT person_id, bool_or(tipped) AS tipped, bool_or(messaged) AS messaged, bool_or(watched) AS watched
  FROM reasons GROUP BY person_id
)
SELECT p.id, COALESCE(alias.alias, p.username) AS name,
  CASE WHEN c.tipped THEN 0 WHEN c.messaged THEN 1 WHEN c.watched THEN 2 ELSE 3 END AS priority
FROM candidates c
JOIN persons p ON p.id = c.person_id
LEFT JOIN LATERAL (
  SELECT a.alias FROM person_aliases a
  WHERE a.person_id = p.id AND a.valid_to IS NULL ORDER BY a.valid_from DESC LIMIT 1
) alias ON true
LEFT JOIN LATERAL (
  SELECT max(s.captured_at) AS captured_at FROM snapshots s
  WHERE s.person_id = p.id AND s.source = 'statbate_member' AND s.captured_at <= $6
) newest ON true
LEFT JOIN snapshot_misses miss ON miss.person_id = p.id AND miss.source = 'statbate_member'
WHERE p.platform = $1 AND NOT COALESCE(p.is_excluded, false) AND p.username <> $2
  AND NOT EXISTS (SELECT 1 FROM rooms r WHERE r.name = p.username)  -- every room's broadcaster, too
  AND (newest.captured_at IS NULL OR newest.captured_at <= $3)
  AND (miss.missed_at IS NULL OR miss.missed_at <= $4 OR miss.missed_at > $6)
  -- A name that is now another person's current alias (a rename linked by did) is that person's to refresh.
  AND NOT EXISTS (
    SELECT 1 FROM person_aliases taken
    WHERE taken.alias = p.username AND taken.platform = p.platform AND taken.valid_to IS NULL
      AND taken.person_id <> p.id
  )
ORDER BY priority, newest.captured_at NULLS FIRST, p.last_seen_at DESC, p.id
LIMIT $5;

-- name: insert_snapshot
INSERT INTO snapshots (person_id, source, captured_at, raw_payload, normalized_metrics)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (person_id, source, captured_at) DO NOTHING
RETURNING id;

-- name: record_snapshot_miss
INSERT INTO snapshot_misses (person_id, source, username, missed_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (person_id, source) DO UPDATE SET username = EXCLUDED.username, missed_at = EXCLUDED.missed_at;

-- name: person_by_did
SELECT id FROM persons WHERE did = $1 AND platform = $2 ORDER BY first_seen_at, id LIMIT 1;

-- name: person_by_rid
SELECT id FROM persons WHERE rid = $1 AND platform = $2 ORDER BY first_seen_at, id LIMIT 1;

-- name: set_person_did
UPDATE persons SET did = $2, updated_at = NOW() WHERE id = $1 AND did IS DISTINCT FROM $2;

-- name: set_person_rid_model
-- A model lookup that found the person: its room id, and MODEL widened into the role (a VIEWER becomes BOTH).
UPDATE persons AS p SET
  rid = $2,
  role = CASE WHEN p.role IN ('MODEL', 'BOTH') THEN p.role WHEN p.role = 'VIEWER' THEN 'BOTH' ELSE 'MODEL' END,
  updated_at = NOW()
WHERE p.id = $1 AND (p.rid IS DISTINCT FROM $2 OR p.role NOT IN ('MODEL', 'BOTH'));

-- name: person_names
-- The original username, the current alias (if any) and whether any alias row exists yet.
SELECT p.username, p.first_seen_at,
  (SELECT a.alias FROM person_aliases a WHERE a.person_id = p.id AND a.valid_to IS NULL
   ORDER BY a.valid_from DESC LIMIT 1) AS current_alias,
  EXISTS (SELECT 1 FROM person_aliases a WHERE a.person_id = p.id) AS has_aliases
FROM persons p WHERE p.id = $1;

-- name: close_current_aliases
UPDATE person_aliases SET valid_to = $2 WHERE person_id = $1 AND valid_to IS NULL;

-- name: insert_alias
INSERT INTO person_aliases (person_id, alias, platform, valid_from, valid_to) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (alias, platform, valid_from) DO NOTHING;

-- name: person_aliases
SELECT alias, valid_from, valid_to FROM person_aliases WHERE person_id = $1 ORDER BY valid_from, alias;

-- name: snapshot_deltas
SELECT source, previous_captured_at, captured_at, delta
FROM snapshot_deltas
WHERE person_id = $1 AND ($2::text IS NULL OR source = $2)
ORDER BY source, captured_at;

-- name: live_sessions_for_staleness
-- Every LIVE session with its newest linked event and the newest Stats API snapshot of its broadcaster (by
-- original username or current alias): what the staleness rule reads. Runs once a minute, off the hot path.
SELECT s.id, s.broadcaster, s.started_at,
  (SELECT max(i.timestamp) FROM interactions i WHERE i.stream_session_id = s.id) AS last_event_at,
  report.captured_at AS report_at, report.raw_payload AS report
FROM stream_sessions s
LEFT JOIN LATERAL (
  SELECT sn.captured_at, sn.raw_payload FROM snapshots sn
  JOIN persons p ON p.id = sn.person_id
  WHERE sn.source = 'cb_stats' AND p.platform = s.platform AND (p.username = s.broadcaster OR EXISTS (
    SELECT 1 FROM person_aliases a
    WHERE a.person_id = p.id AND a.alias = s.broadcaster AND a.valid_to IS NULL
  ))
  ORDER BY sn.captured_at DESC LIMIT 1
) report ON true
WHERE s.status = 'LIVE';

-- name: end_stale_sessions
-- The staleness rule's ends ($1 ids, $2 times = each one's last event, read a moment before). A session that
-- meanwhile got a newer event (the writer committed in between) or is no longer LIVE is left alone.
UPDATE stream_sessions AS s SET status = 'ENDED', ended_at = e.ended_at, end_reason = 'stale', updated_at = NOW()
FROM unnest($1::uuid[], $2::timestamp[]) AS e(id, ended_at)
WHERE s.id = e.id AND s.status = 'LIVE'
  AND NOT EXISTS (SELECT 1 FROM interactions i WHERE i.stream_session_id = s.id AND i.timestamp > e.ended_at)
RETURNING s.id;

-- name: repair_sessions_stored
-- `sessions repair`: every stored session, locked for the repair's transaction.
SELECT id, broadcaster, started_at, ended_at, status, end_reason FROM stream_sessions
ORDER BY broadcaster, started_at, id
FOR UPDATE;

-- name: repair_session_edges
-- `sessions repair`: every stored broadcastStart/broadcastStop event.
SELECT event_id, method, broadcaster, event_time FROM events
WHERE method IN ('broadcastStart', 'broadcastStop')
ORDER BY event_time, event_id;

-- name: repair_last_before
-- `sessions repair`: per (room $1, time $2), the newest cb_events interaction of that room strictly before it.
SELECT m.room, m.at,
  (SELECT max(i.timestamp) FROM interactions i
   WHERE i.source = 'cb_events' AND i.metadata->>'broadcaster' = m.room AND i.timestamp < m.at) AS last_at
FROM unnest($1::text[], $2::timestamp[]) AS m(room, at);

-- name: repair_room_reports
-- `sessions repair`: the newest Stats API snapshot of each room $1 (by original username or current alias).
SELECT r.room, report.captured_at, report.raw_payload
FROM unnest($1::text[]) AS r(room)
JOIN LATERAL (
  SELECT sn.captured_at, sn.raw_payload FROM snapshots sn
  JOIN persons p ON p.id = sn.person_id
  WHERE sn.source = 'cb_stats' AND (p.username = r.room OR EXISTS (
    SELECT 1 FROM person_aliases a WHERE a.person_id = p.id AND a.alias = r.room AND a.valid_to IS NULL
  ))
  ORDER BY sn.captured_at DESC LIMIT 1
) report ON true;

-- name: repair_update_session
UPDATE stream_sessions SET ended_at = $2, end_reason = $3, status = $4, updated_at = NOW() WHERE id = $1;

-- name: repair_relink
-- `sessions repair`: every cb_events interaction moved to the session whose span contains its time (the
-- latest-starting one when spans overlap, none when none does); returns each move.
WITH target AS (
  SELECT i.id, i.stream_session_id AS old_id, (
    SELECT s.id FROM stream_sessions s
    WHERE s.broadcaster = i.metadata->>'broadcaster' AND s.started_at <= i.timestamp
      AND (s.ended_at IS NULL OR i.timestamp <= s.ended_at)
    ORDER BY s.started_at DESC LIMIT 1
  ) AS new_id
  FROM interactions i
  WHERE i.source = 'cb_events'
)
UPDATE interactions i SET stream_session_id = t.new_id
FROM target t
WHERE i.id = t.id AND t.old_id IS DISTINCT FROM t.new_id
RETURNING t.old_id, t.new_id;

-- name: live_session_id
-- The LIVE session of room $1 (at most one, uq_stream_sessions_one_live); $1 NULL: the newest of any room.
SELECT id FROM stream_sessions WHERE status = 'LIVE' AND ($1::text IS NULL OR broadcaster = $1)
ORDER BY started_at DESC LIMIT 1;

-- name: top_tippers
-- Tip tokens per person from TIP_EVENT metadata, in one session ($1) or all time ($1 NULL).
SELECT p.username, sum(COALESCE((i.metadata ->> 'tokens')::numeric, (i.metadata -> 'tip' ->> 'tokens')::numeric, 0))
    AS total, count(*) AS tips
FROM interactions i JOIN persons p ON p.id = i.person_id
WHERE i.type = 'TIP_EVENT' AND ($1::uuid IS NULL OR i.stream_session_id = $1)
  AND (NOT COALESCE(p.is_excluded, false) OR $2)
GROUP BY p.id, p.username
ORDER BY total DESC, p.username
LIMIT $3;

-- name: top_chatters
SELECT p.username, count(*) AS total
FROM interactions i JOIN persons p ON p.id = i.person_id
WHERE i.type IN ('CHAT_MESSAGE', 'PRIVATE_MESSAGE') AND ($1::uuid IS NULL OR i.stream_session_id = $1)
  AND (NOT COALESCE(p.is_excluded, false) OR $2)
GROUP BY p.id, p.username
ORDER BY total DESC, p.username
LIMIT $3;

-- name: watchlist_counts
SELECT w.name, count(p.id) AS members
FROM watchlists w
LEFT JOIN watchlist_members m ON m.watchlist_id = w.id
LEFT JOIN persons p ON p.id = m.person_id AND (NOT COALESCE(p.is_excluded, false) OR $1)
GROUP BY w.name
ORDER BY w.name;

-- name: session_summaries
-- The newest $1 sessions' summaries (migration 014) of room $3 (NULL: every room), oldest first; excluded
-- persons counted only when $2.
SELECT * FROM (
  SELECT * FROM session_summaries_for($2) WHERE $3::text IS NULL OR broadcaster = $3
  ORDER BY started_at DESC, session_id LIMIT $1
) newest ORDER BY started_at, session_id;

-- name: snapshot_counts
SELECT source, count(*) AS snapshots, max(captured_at) AS newest FROM snapshots GROUP BY source ORDER BY source;

-- ---------------------------------------------------------------------------------------------------------------
-- Rooms (issue 11).

-- name: add_room
-- A new room, or an existing one enabled again; true when the row is new.
INSERT INTO rooms AS r (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET enabled = true, updated_at = CASE WHEN r.enabled THEN r.updated_at ELSE NOW() END
RETURNING (xmax = 0) AS added;

-- name: set_room_enabled
UPDATE rooms SET enabled = $2, updated_at = NOW() WHERE name = $1 RETURNING name;

-- name: enabled_rooms
SELECT name FROM rooms WHERE enabled ORDER BY name;

-- name: list_rooms
-- Every room of the table or of the cursor (a single-room daemon's room has no row), with its read position.
SELECT COALESCE(r.name, c.broadcaster) AS name, r.enabled, r.added_at, c.last_event_id, c.updated_at AS polled_at,
  CASE WHEN c.lease_expires_at > now() THEN c.holder END AS holder, COALESCE(c.epoch, 0) AS epoch
FROM rooms r
FULL JOIN ingest_cursor c ON c.broadcaster = r.name
ORDER BY 1;

-- name: heartbeat
-- This daemon is alive ($1: its holder name); the live hosts, itself included, are those heard from within
-- $2 seconds, on the database's clock.
WITH beat AS (
  INSERT INTO hosts AS h (holder) VALUES ($1)
  ON CONFLICT (holder) DO UPDATE SET heartbeat_at = now()
)
SELECT holder FROM hosts WHERE heartbeat_at > now() - make_interval(secs => $2) AND holder <> $1
UNION ALL SELECT $1 ORDER BY 1;

-- name: leave_hosts
DELETE FROM hosts WHERE holder = $1 OR heartbeat_at < now() - interval '1 day';

-- name: ensure_cursors
-- A cursor row (unheld, no position yet) for each room that may be leased ($1), at timeout $2.
INSERT INTO ingest_cursor (broadcaster, last_event_id, timeout_seconds, lease_expires_at)
SELECT unnest($1::text[]), NULL, $2, now()
ON CONFLICT (broadcaster) DO NOTHING;

-- name: acquire_leases
-- Up to $4 of the rooms $2 for holder $1, for $5 seconds, each with a new epoch: rooms no one holds or whose
-- lease ran out, and rooms of this host's own earlier processes, known dead ($3). With $6, only rooms left
-- unheld for longer than a lease: orphans no host took within its share. Rows another transaction holds are
-- skipped, so concurrent hosts never take the same room.
WITH free AS (
  SELECT broadcaster FROM ingest_cursor
  WHERE broadcaster = ANY($2::text[])
    AND (
      holder = ANY($3::text[])
      OR CASE WHEN $6 THEN lease_expires_at < now() - make_interval(secs => $5)
              ELSE holder IS NULL OR lease_expires_at < now() END
    )
  ORDER BY random()
  LIMIT $4
  FOR UPDATE SKIP LOCKED
)
UPDATE ingest_cursor c
SET holder = $1, epoch = c.epoch + 1, lease_expires_at = now() + make_interval(secs => $5)
FROM free WHERE c.broadcaster = free.broadcaster
RETURNING c.broadcaster, c.epoch;

-- name: renew_leases
-- Holder $1 keeps the rooms $2 at epochs $3 for $4 more seconds; returns those still its own. Locks in name
-- order, as a fenced write does.
WITH held AS (
  SELECT c.broadcaster
  FROM ingest_cursor c
  JOIN unnest($2::text[], $3::bigint[]) AS h(room, epoch) ON c.broadcaster = h.room AND c.epoch = h.epoch
  WHERE c.holder = $1
  ORDER BY c.broadcaster
  FOR UPDATE OF c
)
UPDATE ingest_cursor c SET lease_expires_at = now() + make_interval(secs => $4)
FROM held WHERE c.broadcaster = held.broadcaster
RETURNING c.broadcaster;

-- name: release_leases
-- Holder $1 gives up the rooms $2 at epochs $3 (another host may take them at once).
UPDATE ingest_cursor c SET holder = NULL, lease_expires_at = now()
FROM unnest($2::text[], $3::bigint[]) AS h(room, epoch)
WHERE c.broadcaster = h.room AND c.epoch = h.epoch AND c.holder = $1;

-- name: move_fenced_cursors
-- The first statement of a fenced write: move the read position of each room $1 to $3 (NULL keeps it), but
-- only where the lease is still holder $4's at the epochs $2; the rooms returned are those moved. A room not
-- returned moved to another holder: the write must not touch it (the transaction rolls back). The rows are
-- locked in name order (as renew_leases locks them, so the two never deadlock) until the commit, so the
-- transaction may not sit idle longer than $6 (set here for this transaction only, which also works behind a
-- transaction-pooling proxy): a writer frozen inside it is ended by the server, and the rooms can move.
WITH fenced AS (
  SELECT c.broadcaster, f.position
  FROM ingest_cursor c
  JOIN unnest($1::text[], $2::bigint[], $3::text[]) AS f(room, epoch, position)
    ON c.broadcaster = f.room AND c.epoch = f.epoch
  CROSS JOIN (SELECT set_config('idle_in_transaction_session_timeout', $6, true)) AS bounded
  WHERE c.holder = $4
  ORDER BY c.broadcaster
  FOR UPDATE OF c
)
UPDATE ingest_cursor c
SET last_event_id = COALESCE(fenced.position, c.last_event_id), timeout_seconds = $5, updated_at = NOW()
FROM fenced WHERE c.broadcaster = fenced.broadcaster
RETURNING c.broadcaster;

-- name: room_leases
-- Every leased room: holder, epoch, seconds left (negative: ran out), and the position.
SELECT broadcaster, holder, epoch, EXTRACT(EPOCH FROM lease_expires_at - now())::float8 AS seconds_left,
  last_event_id
FROM ingest_cursor ORDER BY broadcaster;

-- name: acquire_cluster_lease
-- The cluster lease $1 for holder $2 for $3 seconds when free, run out or already its own (renewed, same
-- epoch); returns the epoch, or nothing when another live holder has it.
INSERT INTO cluster_leases AS l (name, holder, epoch, lease_expires_at)
VALUES ($1, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET
  holder = $2,
  epoch = CASE WHEN l.holder = $2 THEN l.epoch ELSE l.epoch + 1 END,
  lease_expires_at = now() + make_interval(secs => $3)
WHERE l.holder = $2 OR l.holder IS NULL OR l.lease_expires_at < now()
RETURNING epoch;

-- name: release_cluster_lease
UPDATE cluster_leases SET holder = NULL, lease_expires_at = now() WHERE name = $1 AND holder = $2;

-- name: local_holders
-- Holders named after host $1 (`host:pid`) that hold rooms or have a heartbeat row: this host's earlier
-- processes among them.
SELECT holder FROM ingest_cursor WHERE starts_with(holder, $1 || ':')
UNION SELECT holder FROM hosts WHERE starts_with(holder, $1 || ':');
