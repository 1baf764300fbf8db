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

-- name: insert_events
-- The idempotency point: a re-delivered event hits the primary key and is not returned.
INSERT INTO events (event_id, method, broadcaster, event_time, received_at, raw)
SELECT e.event_id, e.method, e.broadcaster, e.event_time, $5, e.raw::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamp[], $6::text[])
  AS e(event_id, method, broadcaster, event_time, raw)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: resolve_aliases
-- Names that are a current alias: they belong to the aliased person, not to a persons row of that name.
SELECT DISTINCT ON (n.name) n.name, a.person_id, p.username
FROM unnest($1::text[]) AS n(name)
JOIN person_aliases a ON a.alias = n.name AND a.platform = $2 AND a.valid_to IS NULL
JOIN persons p ON p.id = a.person_id
ORDER BY n.name, a.valid_from DESC;

-- name: upsert_persons
-- The person bookkeeping rule, in one statement for a whole batch (find_or_create_person uses it too):
-- persons found through an alias ($1..$3) are touched; the other names ($4..$7) are created or touched.
-- last_seen_at only moves forward; roles widen (VIEWER + MODEL = BOTH, as db.widen_role); a person created
-- under an excluded name ($9) starts excluded and joins the Excluded watchlist ($10). $8 is the platform.
WITH touched AS (
  UPDATE persons AS p SET
    last_seen_at = GREATEST(p.last_seen_at, t.seen),
    role = CASE
      WHEN p.role = t.role OR t.role = 'UNKNOWN' THEN p.role
      WHEN p.role = 'UNKNOWN' THEN t.role
      ELSE 'BOTH'
    END,
    updated_at = CASE
      WHEN t.seen > p.last_seen_at OR p.role IS DISTINCT FROM t.role THEN NOW()
      ELSE p.updated_at
    END
  FROM unnest($1::uuid[], $2::timestamp[], $3::text[]) AS t(id, seen, role)
  WHERE p.id = t.id
  RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at,
    p.is_excluded, NULL::text AS name, false AS inserted
), upserted AS (
  INSERT INTO persons AS p (username, platform, role, first_seen_at, last_seen_at, is_excluded)
  SELECT u.name, $8, u.role, u.first_seen, u.last_seen, u.name = ANY($9::text[])
  FROM unnest($4::text[], $5::text[], $6::timestamp[], $7::timestamp[]) AS u(name, role, first_seen, last_seen)
  ORDER BY u.name
  ON CONFLICT (username, platform) DO UPDATE SET
    last_seen_at = GREATEST(p.last_seen_at, EXCLUDED.last_seen_at),
    role = CASE
      WHEN p.role = EXCLUDED.role OR EXCLUDED.role = 'UNKNOWN' THEN p.role
      WHEN p.role = 'UNKNOWN' THEN EXCLUDED.role
      ELSE 'BOTH'
    END,
    updated_at = CASE
      WHEN EXCLUDED.last_seen_at > p.last_seen_at OR p.role IS DISTINCT FROM EXCLUDED.role THEN NOW()
      ELSE p.updated_at
    END
  RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at,
    p.is_excluded, p.username AS name, (xmax = 0) AS inserted
), listed AS (
  INSERT INTO watchlist_members (watchlist_id, person_id)
  SELECT w.id, u.id FROM upserted u JOIN watchlists w ON w.name = $10
  WHERE u.inserted AND u.is_excluded
  ON CONFLICT (watchlist_id, person_id) DO NOTHING
)
SELECT * FROM touched
UNION ALL
SELECT * FROM upserted;

-- name: live_sessions
SELECT id, broadcaster, started_at FROM stream_sessions
WHERE status = 'LIVE' AND broadcaster = ANY($1::text[]);

-- name: end_sessions
UPDATE stream_sessions AS s SET status = 'ENDED', ended_at = e.ended_at, updated_at = NOW()
FROM unnest($1::uuid[], $2::timestamp[]) AS e(id, ended_at)
WHERE s.id = e.id;

-- name: insert_sessions
INSERT INTO stream_sessions (id, platform, broadcaster, started_at, ended_at, status)
SELECT s.id, $1, s.broadcaster, s.started_at, s.ended_at, CASE WHEN s.ended_at IS NULL THEN 'LIVE' ELSE 'ENDED' END
FROM unnest($2::uuid[], $3::text[], $4::timestamp[], $5::timestamp[]) AS s(id, broadcaster, started_at, ended_at);

-- name: insert_interactions
-- Only rows of events new in this transaction arrive here; the guard index makes a repeat a no-op, never a
-- second row (for instance when an events row was deleted by hand and its event is delivered again).
INSERT INTO interactions (person_id, stream_session_id, type, content, timestamp, source, metadata)
SELECT i.person_id, i.session_id, i.type, i.content, i.at, $1, i.metadata::jsonb
FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamp[], $7::text[])
  AS i(person_id, session_id, type, content, at, metadata)
ON CONFLICT ((metadata->>'event_id')) WHERE source = 'cb_events' DO NOTHING;

-- name: insert_quarantined
INSERT INTO quarantined_events (fingerprint, event_id, method, raw, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
ON CONFLICT (fingerprint) DO NOTHING;

-- name: save_cursor
-- A page without a next id (nextUrl null) keeps the last committed position rather than forgetting it.
INSERT INTO ingest_cursor AS c (broadcaster, last_event_id, timeout_seconds, updated_at)
VALUES ($1, $2, $3, NOW())
ON CONFLICT (broadcaster) DO UPDATE SET
  last_event_id = COALESCE(EXCLUDED.last_event_id, c.last_event_id),
  timeout_seconds = EXCLUDED.timeout_seconds,
  updated_at = NOW();
