"""The one-shot commands a person runs: `demo` and `replay`, as real child processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import asyncpg

from tests.conftest import shared_path
from tests.daemon_process import run_command


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env["MHC_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


_run = run_command


def test_demo_shows_events_flowing_into_an_embedded_database(tmp_path: Path) -> None:
    result = _run(["demo", "--duration", "4", "--rate", "100"], _env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    progress = [line for line in out.splitlines() if "events/s" in line]
    assert len(progress) >= 3, out
    stored_line = next(line for line in out.splitlines() if line.startswith("stored:"))
    stored_events = int(stored_line.split(":")[1].split()[0])
    assert stored_events >= 300, stored_line
    assert "TIP_EVENT" in out and "statbate_member" in out and "cb_stats" in out
    summary = out.split("Show summaries:", 1)[1]
    assert "tokens" in summary and "top tippers:" in summary and "LIVE" in summary, summary
    gaps = out.split("Gaps in the feed:", 1)[1]
    assert "continuation_jump" in gaps, gaps  # the demo's one jump, halfway through
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "the demo never touches the user's data directory"


async def test_replay_is_idempotent_and_leaves_the_cursor_alone(tmp_path: Path, database_url: str) -> None:
    bodies = [
        shared_path("fixtures", "testbed-response-cb-events.json").read_text(),
        shared_path("fixtures", "testbed-response-nexturl-null.json").read_text(),
    ]
    recording = tmp_path / "responses.jsonl"
    # The API's 400 continuation (no events) is an empty page to replay, as it is to the poller.
    continuation = json.dumps({"status": "waited too long", "nextUrl": "https://x.test/events/u/t/?i=1"})
    recording.write_text(
        "\n".join(json.dumps(json.loads(body)) for body in [*bodies, continuation]) + "\nnot json\n"
    )
    env = _env(tmp_path, MHC_DATABASE_URL=database_url, MHC_CB_USERNAME="mrslaw")

    first = _run(["replay", str(recording)], env, tmp_path)
    assert first.returncode == 1, first.stderr  # the unreadable line is reported, not skipped silently
    assert "4 responses: 9 events stored, 0 already stored, 0 quarantined, 1 unreadable lines" in first.stdout
    assert "replay_line_unreadable" in first.stderr

    second = _run(["replay", str(recording)], env, tmp_path)
    assert "0 events stored, 9 already stored" in second.stdout

    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM events") == 9
        assert await connection.fetchval("SELECT count(*) FROM interactions") == 9
        assert await connection.fetchval("SELECT count(*) FROM ingest_cursor") == 0
    finally:
        await connection.close()
