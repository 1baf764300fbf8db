-- 017_leases.sql: rooms leased to hosts, every write fenced by the lease's epoch (issue 12).
--
-- The seed has one daemon. Several identical daemons now share the rooms through PostgreSQL alone:
-- * A room's lease lives on its cursor row (ingest_cursor): the holder (`host id:pid`), an epoch that grows
--   with every new holder, and an expiry on the database's clock. The writer's transaction first locks the
--   rows of its rooms where holder and epoch are still its own; a room whose lease moved on is not written.
-- * hosts: one row per running daemon with its heartbeat, so each can take about rooms / live hosts.
-- * cluster_leases: leases that are not rooms ('snapshots': the Statbate and Stats API lookups run on one
--   host of the cluster).
-- Existing cursor rows start unheld at epoch 0.

-- migrate:up
ALTER TABLE ingest_cursor
  ADD COLUMN IF NOT EXISTS holder VARCHAR(255),
  ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS hosts (
  holder VARCHAR(255) PRIMARY KEY,
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cluster_leases (
  name VARCHAR(64) PRIMARY KEY,
  holder VARCHAR(255),
  epoch BIGINT NOT NULL DEFAULT 0,
  lease_expires_at TIMESTAMPTZ
);

-- migrate:down
DROP TABLE IF EXISTS cluster_leases;
DROP TABLE IF EXISTS hosts;
ALTER TABLE ingest_cursor DROP COLUMN IF EXISTS lease_expires_at, DROP COLUMN IF EXISTS epoch,
  DROP COLUMN IF EXISTS holder;
