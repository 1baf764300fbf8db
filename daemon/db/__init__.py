"""The database layer: the only package that touches the asyncpg pool, one module per concern.

One async function per operation. Each returns plain dataclasses and turns asyncpg's errors into ours.
Timestamps are naive UTC `datetime`s, matching the seed's TIMESTAMP columns (every session runs in UTC).
Callers use `db.<name>`; the names below are the package's surface.
"""

from daemon.db.core import (
    CONNECT_TIMEOUT_SECONDS as CONNECT_TIMEOUT_SECONDS,
)
from daemon.db.core import (
    EXCLUDED_USERNAMES as EXCLUDED_USERNAMES,
)
from daemon.db.core import (
    EXCLUDED_WATCHLIST as EXCLUDED_WATCHLIST,
)
from daemon.db.core import (
    PLATFORM as PLATFORM,
)
from daemon.db.core import (
    ROLES as ROLES,
)
from daemon.db.core import (
    Connection as Connection,
)
from daemon.db.core import (
    Pool as Pool,
)
from daemon.db.core import (
    connect as connect,
)
from daemon.db.core import (
    is_transient as is_transient,
)
from daemon.db.core import (
    open_pool as open_pool,
)
from daemon.db.core import (
    ping as ping,
)
from daemon.db.core import (
    row_count as row_count,
)
from daemon.db.core import (
    schema_is_current as schema_is_current,
)
from daemon.db.core import (
    single_connection as single_connection,
)
from daemon.db.core import (
    translate_errors as translate_errors,
)
from daemon.db.core import (
    utc_naive as utc_naive,
)
from daemon.db.core import (
    utc_now as utc_now,
)
from daemon.db.failures import (
    recent_api_failures as recent_api_failures,
)
from daemon.db.failures import (
    record_api_failure as record_api_failure,
)
from daemon.db.persons import (
    Alias as Alias,
)
from daemon.db.persons import (
    Person as Person,
)
from daemon.db.persons import (
    Sighting as Sighting,
)
from daemon.db.persons import (
    find_or_create_many as find_or_create_many,
)
from daemon.db.persons import (
    find_or_create_person as find_or_create_person,
)
from daemon.db.persons import (
    find_person as find_person,
)
from daemon.db.persons import (
    normalize_username as normalize_username,
)
from daemon.db.persons import (
    person_aliases as person_aliases,
)
from daemon.db.persons import (
    see as see,
)
from daemon.db.persons import (
    widen_role as widen_role,
)
from daemon.db.report_rows import (
    Ranked as Ranked,
)
from daemon.db.report_rows import (
    top_chatters as top_chatters,
)
from daemon.db.report_rows import (
    top_tippers as top_tippers,
)
from daemon.db.report_rows import (
    watchlist_counts as watchlist_counts,
)
from daemon.db.rooms import (
    Room as Room,
)
from daemon.db.rooms import (
    add_room as add_room,
)
from daemon.db.rooms import (
    enabled_rooms as enabled_rooms,
)
from daemon.db.rooms import (
    list_rooms as list_rooms,
)
from daemon.db.rooms import (
    set_room_enabled as set_room_enabled,
)
from daemon.db.session_rows import (
    RepairOutcome as RepairOutcome,
)
from daemon.db.session_rows import (
    SessionSummary as SessionSummary,
)
from daemon.db.session_rows import (
    end_stale_sessions as end_stale_sessions,
)
from daemon.db.session_rows import (
    live_session_id as live_session_id,
)
from daemon.db.session_rows import (
    live_sessions as live_sessions,
)
from daemon.db.session_rows import (
    repair_sessions as repair_sessions,
)
from daemon.db.session_rows import (
    session_summaries as session_summaries,
)
from daemon.db.snapshot_rows import (
    SNAPSHOT_SOURCES as SNAPSHOT_SOURCES,
)
from daemon.db.snapshot_rows import (
    DueMember as DueMember,
)
from daemon.db.snapshot_rows import (
    SnapshotCount as SnapshotCount,
)
from daemon.db.snapshot_rows import (
    SnapshotDelta as SnapshotDelta,
)
from daemon.db.snapshot_rows import (
    StoredSnapshot as StoredSnapshot,
)
from daemon.db.snapshot_rows import (
    due_member_lookups as due_member_lookups,
)
from daemon.db.snapshot_rows import (
    newest_api_failure_at as newest_api_failure_at,
)
from daemon.db.snapshot_rows import (
    newest_snapshot_at as newest_snapshot_at,
)
from daemon.db.snapshot_rows import (
    newest_snapshot_miss_at as newest_snapshot_miss_at,
)
from daemon.db.snapshot_rows import (
    record_identified_snapshot as record_identified_snapshot,
)
from daemon.db.snapshot_rows import (
    record_snapshot as record_snapshot,
)
from daemon.db.snapshot_rows import (
    record_snapshot_miss as record_snapshot_miss,
)
from daemon.db.snapshot_rows import (
    snapshot_counts as snapshot_counts,
)
from daemon.db.snapshot_rows import (
    snapshot_deltas as snapshot_deltas,
)
from daemon.db.writer import (
    Cursor as Cursor,
)
from daemon.db.writer import (
    WriteResult as WriteResult,
)
from daemon.db.writer import (
    combined as combined,
)
from daemon.db.writer import (
    ingest_gaps as ingest_gaps,
)
from daemon.db.writer import (
    load_cursor as load_cursor,
)
from daemon.db.writer import (
    write_batch as write_batch,
)
