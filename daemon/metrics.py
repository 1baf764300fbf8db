"""Prometheus metrics, one registry for the process. Labels never carry a token or a URL."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter(
    "mhc_events_total", "Events stored for the first time, by method.", ["method"], registry=REGISTRY
)
DUPLICATES = Counter("mhc_events_duplicate_total", "Re-delivered events skipped.", registry=REGISTRY)
QUARANTINED = Counter("mhc_events_quarantined_total", "Events kept in quarantine.", registry=REGISTRY)
UNKNOWN_METHODS = Counter(
    "mhc_events_unknown_method_total", "Events of a method this version does not know.", registry=REGISTRY
)
INGEST_GAPS = Counter(
    "mhc_ingest_gaps_total",
    "Stretches of the feed the read position moved over without their events (ingest_gaps rows).",
    registry=REGISTRY,
)
STALE_STOPS = Counter(
    "mhc_broadcast_stops_stale_total",
    "broadcastStop events older than the session they met (a replay, a late re-delivery): no change made.",
    registry=REGISTRY,
)
ROWS = Counter("mhc_rows_written_total", "Rows written, by table.", ["table"], registry=REGISTRY)
API_REQUESTS = Counter(
    "mhc_api_requests_total",
    "External API requests, by API and HTTP status.",
    ["api", "status"],
    registry=REGISTRY,
)
API_FAILURES = Counter(
    "mhc_api_failures_total",
    "Failed external API calls, by API and kind.",
    ["api", "kind"],
    registry=REGISTRY,
)
SNAPSHOTS = Counter("mhc_snapshots_total", "Snapshots taken, by source.", ["source"], registry=REGISTRY)
POLL_SECONDS = Histogram(
    "mhc_poll_seconds",
    "Events API request latency (long-polls included).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
WRITE_SECONDS = Histogram(
    "mhc_write_seconds",
    "Time to commit one write transaction (the responses of one or more rooms).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
WRITE_ROOMS = Histogram(
    "mhc_write_rooms",
    "Rooms whose responses one write transaction committed together (group commit).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
    registry=REGISTRY,
)
INGEST_LAG = Gauge(
    "mhc_ingest_lag_seconds", "Commit time minus the newest committed event's server time.", registry=REGISTRY
)
DATABASE_UP = Gauge("mhc_database_up", "1 when the database answered the last check.", registry=REGISTRY)
LAST_POLL = Gauge(
    "mhc_last_successful_poll_timestamp_seconds", "Unix time of the last successful poll.", registry=REGISTRY
)
SPOOL_BYTES = Gauge("mhc_spool_bytes", "Bytes waiting in the disk spool.", registry=REGISTRY)
# Per room: rooms are bounded by configuration, so a label per room is bounded too.
ROOM_EVENTS = Counter(
    "mhc_room_events_total", "Events stored for the first time, by room.", ["room"], registry=REGISTRY
)
ROOM_LAST_EVENT = Gauge(
    "mhc_room_last_event_timestamp_seconds",
    "Server time of the room's newest stored event (Unix seconds), for the rooms polled now.",
    ["room"],
    registry=REGISTRY,
)
ROOM_TOKEN_REJECTED = Gauge(
    "mhc_room_token_rejected", "1 while the Events API rejects the room's token.", ["room"], registry=REGISTRY
)
ROOM_SPOOL_BYTES = Gauge(
    "mhc_room_spool_bytes", "Bytes waiting in the room's disk spool.", ["room"], registry=REGISTRY
)
LEASES_ACQUIRED = Counter("mhc_leases_acquired_total", "Room leases this daemon took.", registry=REGISTRY)
LEASES_LOST = Counter(
    "mhc_leases_lost_total",
    "Room leases this daemon lost (not renewed in time, or taken over).",
    registry=REGISTRY,
)
FENCED_WRITES = Counter(
    "mhc_fenced_writes_total",
    "Write transactions rolled back because a room's lease had moved to another holder.",
    registry=REGISTRY,
)
ROOMS_HELD = Gauge("mhc_rooms_held", "Rooms whose lease this daemon holds.", registry=REGISTRY)
