-- 009_seed_watchlists.sql: the five system watchlists the seed schema lists.
--
-- Deviation from the seed: its plain INSERT would fail on a second run (watchlists.name is UNIQUE);
-- ON CONFLICT DO NOTHING makes the seed idempotent. The down part removes exactly these five lists.

-- migrate:up
INSERT INTO watchlists (name, description) VALUES
  ('Friends', 'Trusted and friendly users'),
  ('Known Streamers', 'Models I recognize or have interacted with'),
  ('Ones to Watch', 'Interesting users to track'),
  ('Banned But Craved', 'Users I want to monitor despite restrictions'),
  ('Excluded', 'Users excluded from all stats and summaries')
ON CONFLICT (name) DO NOTHING;

-- migrate:down
DELETE FROM watchlists
WHERE name IN ('Friends', 'Known Streamers', 'Ones to Watch', 'Banned But Craved', 'Excluded');
