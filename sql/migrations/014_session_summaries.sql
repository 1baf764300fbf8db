-- 014_session_summaries.sql: what each show came to.
--
-- * session_summaries_for(include_excluded): one row per stream session with its start, end, duration (to
--   its latest event while LIVE: a replayed recording's show is not "live" until now), end reason (012),
--   tips and tokens (tokens per hour of the duration), unique chatters (public chat, the broadcaster not
--   counted), unique tippers, unique visitors (USER_ENTER), follows, unfollows,
--   fan-club joins, media purchases (events, not persons), the top five tippers (a JSON array of
--   {username, tokens, tips}), and the Stats API's token_balance across the session where cb_stats snapshots
--   of the broadcaster bracket it: the last one at or before the start and the first at or after the end.
--   tokens_not_in_events is that change minus every tip of the session (excluded persons' tips reach the
--   balance too): income the Events API never reports, private and spy shows.
--   Persons marked is_excluded are left out of every figure unless include_excluded (the seed's rule).
-- * session_summaries: the same with exclusions applied, the default of every aggregate.

-- migrate:up

CREATE OR REPLACE FUNCTION session_summaries_for(include_excluded BOOLEAN)
RETURNS TABLE (
  session_id UUID,
  broadcaster VARCHAR,
  status VARCHAR,
  started_at TIMESTAMP,
  ended_at TIMESTAMP,
  duration_s DOUBLE PRECISION,
  end_reason TEXT,
  tokens_tipped NUMERIC,
  tips BIGINT,
  tokens_per_hour NUMERIC,
  unique_chatters BIGINT,
  unique_tippers BIGINT,
  unique_visitors BIGINT,
  new_followers BIGINT,
  unfollows BIGINT,
  fan_club_joins BIGINT,
  media_purchases BIGINT,
  top_tippers JSONB,
  token_balance_before NUMERIC,
  token_balance_after NUMERIC,
  token_balance_change NUMERIC,
  tokens_not_in_events NUMERIC
)
LANGUAGE sql STABLE
AS $$
  SELECT s.id, s.broadcaster, s.status, s.started_at, s.ended_at, d.seconds, s.end_reason::text,
    COALESCE(f.tokens, 0), f.tips,
    CASE WHEN d.seconds > 0 THEN round(COALESCE(f.tokens, 0) * 3600 / d.seconds::numeric, 1) END,
    f.chatters, f.tippers, f.visitors, f.follows, f.unfollows, f.fan_club_joins, f.media_purchases,
    COALESCE(top.tippers, '[]'::jsonb),
    before.balance, after.balance, after.balance - before.balance,
    after.balance - before.balance - every_tip.tokens
  FROM stream_sessions s
  CROSS JOIN LATERAL (
    SELECT EXTRACT(EPOCH FROM COALESCE(
      s.ended_at,
      (SELECT max(i.timestamp) FROM interactions i WHERE i.stream_session_id = s.id),
      s.started_at
    ) - s.started_at)::double precision AS seconds
  ) d
  CROSS JOIN LATERAL (
    SELECT
      sum(t.tokens) AS tokens,
      count(*) FILTER (WHERE i.type = 'TIP_EVENT') AS tips,
      count(DISTINCT i.person_id) FILTER (WHERE i.type = 'CHAT_MESSAGE' AND p.username <> s.broadcaster)
        AS chatters,
      count(DISTINCT i.person_id) FILTER (WHERE i.type = 'TIP_EVENT') AS tippers,
      count(DISTINCT i.person_id) FILTER (WHERE i.type = 'USER_ENTER') AS visitors,
      count(*) FILTER (WHERE i.type = 'FOLLOW') AS follows,
      count(*) FILTER (WHERE i.type = 'UNFOLLOW') AS unfollows,
      count(*) FILTER (WHERE i.type = 'FANCLUB_JOIN') AS fan_club_joins,
      count(*) FILTER (WHERE i.type = 'MEDIA_PURCHASE') AS media_purchases
    FROM interactions i
    JOIN persons p ON p.id = i.person_id
    CROSS JOIN LATERAL (
      SELECT CASE WHEN i.type = 'TIP_EVENT' THEN COALESCE(
        (i.metadata ->> 'tokens')::numeric, (i.metadata -> 'tip' ->> 'tokens')::numeric, 0) END AS tokens
    ) t
    WHERE i.stream_session_id = s.id AND (NOT COALESCE(p.is_excluded, false) OR include_excluded)
  ) f
  LEFT JOIN LATERAL (
    SELECT jsonb_agg(jsonb_build_object('username', ranked.username, 'tokens', ranked.tokens, 'tips', ranked.tips)
      ORDER BY ranked.tokens DESC, ranked.username) AS tippers
    FROM (
      SELECT p.username,
        sum(COALESCE((i.metadata ->> 'tokens')::numeric, (i.metadata -> 'tip' ->> 'tokens')::numeric, 0))
          AS tokens,
        count(*) AS tips
      FROM interactions i JOIN persons p ON p.id = i.person_id
      WHERE i.stream_session_id = s.id AND i.type = 'TIP_EVENT'
        AND (NOT COALESCE(p.is_excluded, false) OR include_excluded)
      GROUP BY p.id, p.username
      ORDER BY tokens DESC, p.username
      LIMIT 5
    ) ranked
  ) top ON true
  LEFT JOIN LATERAL (
    SELECT COALESCE(sum(COALESCE(
      (i.metadata ->> 'tokens')::numeric, (i.metadata -> 'tip' ->> 'tokens')::numeric, 0)), 0) AS tokens
    FROM interactions i WHERE i.stream_session_id = s.id AND i.type = 'TIP_EVENT'
  ) every_tip ON true
  LEFT JOIN persons owner ON owner.username = s.broadcaster AND owner.platform = s.platform
  LEFT JOIN LATERAL (
    SELECT (n.normalized_metrics ->> 'token_balance')::numeric AS balance
    FROM snapshots n
    WHERE n.person_id = owner.id AND n.source = 'cb_stats' AND n.captured_at <= s.started_at
      AND jsonb_typeof(n.normalized_metrics -> 'token_balance') = 'number'
    ORDER BY n.captured_at DESC LIMIT 1
  ) before ON true
  LEFT JOIN LATERAL (
    SELECT (n.normalized_metrics ->> 'token_balance')::numeric AS balance
    FROM snapshots n
    WHERE n.person_id = owner.id AND n.source = 'cb_stats' AND n.captured_at >= s.ended_at
      AND jsonb_typeof(n.normalized_metrics -> 'token_balance') = 'number'
    ORDER BY n.captured_at LIMIT 1
  ) after ON true
$$;

CREATE OR REPLACE VIEW session_summaries AS SELECT * FROM session_summaries_for(false);

-- migrate:down
DROP VIEW IF EXISTS session_summaries;
DROP FUNCTION IF EXISTS session_summaries_for(BOOLEAN);
