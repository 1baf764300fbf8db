-- 011_snapshot_functions.sql: what the snapshot scheduler and the delta read side need beyond the seed.
--
-- * snapshot_metrics_delta(old, new): the seed's delta algorithm over two normalized_metrics objects. The keys
--   are the union of both objects' keys; a key holds new - old when both values are JSON numbers, else null.
--   Deltas are computed, never stored: this function and the view below are the only place they exist.
-- * snapshot_deltas: every consecutive pair of snapshots of one person and one source (ordered by
--   captured_at), with the delta of their normalized_metrics.
-- * snapshot_misses: the newest "not found" answer per person and snapshot source, so that a name the API does
--   not know is not asked again for a long time, across restarts. Every miss is also an api_failures row;
--   this table only holds the latest one per (person, source) so the due query stays a cheap join.

-- migrate:up
CREATE OR REPLACE FUNCTION snapshot_metrics_delta(old_metrics JSONB, new_metrics JSONB)
RETURNS JSONB
LANGUAGE sql IMMUTABLE
AS $$
  SELECT COALESCE(
    jsonb_object_agg(
      metric,
      CASE
        WHEN jsonb_typeof(old_metrics -> metric) = 'number' AND jsonb_typeof(new_metrics -> metric) = 'number'
          THEN to_jsonb((new_metrics ->> metric)::numeric - (old_metrics ->> metric)::numeric)
        ELSE 'null'::jsonb
      END
    ),
    '{}'::jsonb
  )
  FROM (
    SELECT jsonb_object_keys(COALESCE(old_metrics, '{}'::jsonb))
    UNION
    SELECT jsonb_object_keys(COALESCE(new_metrics, '{}'::jsonb))
  ) AS metrics(metric)
$$;

CREATE OR REPLACE VIEW snapshot_deltas AS
SELECT person_id, source, previous_id, id, previous_captured_at, captured_at,
  snapshot_metrics_delta(previous_metrics, normalized_metrics) AS delta
FROM (
  SELECT s.person_id, s.source, s.id, s.captured_at, s.normalized_metrics,
    lag(s.id) OVER pair AS previous_id,
    lag(s.captured_at) OVER pair AS previous_captured_at,
    lag(s.normalized_metrics) OVER pair AS previous_metrics
  FROM snapshots s
  WINDOW pair AS (PARTITION BY s.person_id, s.source ORDER BY s.captured_at)
) AS ordered
WHERE previous_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS snapshot_misses (
  person_id UUID NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
  source VARCHAR(50) NOT NULL,
  username VARCHAR(255) NOT NULL,
  missed_at TIMESTAMP NOT NULL,
  PRIMARY KEY (person_id, source)
);

-- migrate:down
DROP TABLE IF EXISTS snapshot_misses;
DROP VIEW IF EXISTS snapshot_deltas;
DROP FUNCTION IF EXISTS snapshot_metrics_delta(JSONB, JSONB);
