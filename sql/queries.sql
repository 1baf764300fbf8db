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
