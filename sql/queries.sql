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

-- name: upsert_person
-- Creates the person, or moves last_seen_at forward and widens the role (VIEWER + MODEL = BOTH).
INSERT INTO persons AS p (username, platform, role, first_seen_at, last_seen_at, is_excluded)
VALUES ($1, $2, $3, $4, $4, $5)
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
RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at, p.is_excluded,
  (xmax = 0) AS inserted;

-- name: touch_person
-- Same bookkeeping as upsert_person, for a person found by alias.
UPDATE persons AS p SET
  last_seen_at = GREATEST(p.last_seen_at, $2),
  role = CASE
    WHEN p.role = $3 OR $3 = 'UNKNOWN' THEN p.role
    WHEN p.role = 'UNKNOWN' THEN $3
    ELSE 'BOTH'
  END,
  updated_at = NOW()
WHERE p.id = $1
RETURNING p.id, p.username, p.platform, p.role, p.rid, p.did, p.first_seen_at, p.last_seen_at, p.is_excluded;

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
-- excluded persons, the broadcaster ($2), names the API did not know since $4 and names now resolving to
-- another person. Tippers first, then people
-- who messaged, then watchlist members, then the rest; never-snapshotted before stale within a rank.
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
  WHERE s.person_id = p.id AND s.source = 'statbate_member'
) newest ON true
LEFT JOIN snapshot_misses miss ON miss.person_id = p.id AND miss.source = 'statbate_member'
WHERE p.platform = $1 AND NOT COALESCE(p.is_excluded, false) AND p.username <> $2
  AND (newest.captured_at IS NULL OR newest.captured_at <= $3)
  AND (miss.missed_at IS NULL OR miss.missed_at <= $4)
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

-- name: live_session_id
SELECT id FROM stream_sessions WHERE status = 'LIVE' ORDER BY started_at DESC LIMIT 1;

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

-- name: snapshot_counts
SELECT source, count(*) AS snapshots, max(captured_at) AS newest FROM snapshots GROUP BY source ORDER BY source;
