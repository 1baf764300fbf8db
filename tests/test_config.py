"""Configuration: defaults, and every wrong value giving one line and exit 78 before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import config, credentials, errors, logs
from tests.daemon_process import run_command

BAD_VALUES = [
    ("MHC_DATABASE_URL", "mysql://root@localhost/db", "must be a postgresql:// URL"),
    ("MHC_CB_EVENTS_TIMEOUT", "abc", "valid integer"),
    ("MHC_CB_EVENTS_TIMEOUT", "91", "less than or equal to 90"),
    ("MHC_HEALTH_PORT", "70000", "less than or equal to 65535"),
    ("MHC_SHUTDOWN_TIMEOUT", "-1", "greater than 0"),
    ("MHC_STATBATE_REQUESTS_PER_MINUTE", "500", "less than or equal to 119"),
    ("MHC_CB_EVENTS_BASE_URL", "ftp://example", "http:// or https://"),
    ("MHC_LOG_FORMAT", "xml", "'auto', 'json' or 'console'"),
    ("MHC_MIGRATE_ON_START", "perhaps", "valid boolean"),
    ("MHC_HOST_ID", "studio:a", "must not contain ':' or spaces"),
    ("MHC_LEASE_RENEW_SECONDS", "15", "MHC_LEASE_RENEW_SECONDS must be at most half of MHC_LEASE_SECONDS"),
]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env["MHC_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("MHC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env here
    settings = config.load()
    assert settings.database_url is None
    assert settings.cb_events_base_url == "https://eventsapi.chaturbate.com"
    assert settings.cb_events_timeout == 30
    assert (settings.health_host, settings.health_port) == ("127.0.0.1", 8787)
    assert settings.data_dir.name == "mhc-daemon"


def test_dotenv_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MHC_CB_EVENTS_TIMEOUT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MHC_CB_EVENTS_TIMEOUT=45\nMHC_CB_EVENTS_TOKEN=abcdefabcdefabcdefabcdef\n")
    settings = config.load()
    assert settings.cb_events_timeout == 45
    assert settings.cb_events_token is not None
    assert "abcdef" not in repr(settings)


@pytest.mark.parametrize(("variable", "value", "message"), BAD_VALUES)
def test_bad_value_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(errors.ConfigError) as caught:
        config.load()
    assert variable in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(("variable", "value", "message"), BAD_VALUES[:3])
def test_bad_value_exits_78_with_one_line(tmp_path: Path, variable: str, value: str, message: str) -> None:
    env = _clean_env(tmp_path) | {variable: value}
    result = run_command(["migrate", "status"], env, tmp_path)
    assert result.returncode == errors.EX_CONFIG
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "nothing may start before the configuration is valid"


def test_secret_values_are_never_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MHC_DATABASE_URL", "mysql://user:sekrit-password@host/db")
    with pytest.raises(errors.ConfigError) as caught:
        config.load()
    assert "sekrit" not in str(caught.value)


def _without_mhc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("MHC_") or key == config.CREDENTIALS_DIRECTORY:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_tokens_come_from_files_and_systemd_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without_mhc(monkeypatch, tmp_path)
    (tmp_path / "events").write_text("events-token-from-file\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "statbate_token").write_text("  statbate-token-from-systemd  ")
    monkeypatch.setenv("MHC_CB_EVENTS_TOKEN_FILE", str(tmp_path / "events"))
    monkeypatch.setenv("MHC_CB_STATS_TOKEN", "stats-token-from-variable")
    monkeypatch.setenv(config.CREDENTIALS_DIRECTORY, str(credentials))
    settings = config.load()
    tokens = {name: getattr(settings, name).get_secret_value() for name in config.TOKEN_SETTINGS}
    assert tokens == {
        "cb_events_token": "events-token-from-file",
        "cb_stats_token": "stats-token-from-variable",
        "statbate_token": "statbate-token-from-systemd",
    }
    assert "from-file" not in repr(settings) and "from-systemd" not in repr(settings)


@pytest.mark.parametrize("problem", ["both", "unreadable"])
def test_a_token_file_problem_exits_78_with_one_line(tmp_path: Path, problem: str) -> None:
    env = _clean_env(tmp_path) | {"MHC_CB_EVENTS_TOKEN_FILE": str(tmp_path / "missing-token")}
    if problem == "both":
        (tmp_path / "missing-token").write_text("tok-from-file-tok")
        env["MHC_CB_EVENTS_TOKEN"] = "tok-from-variable-tok"
    result = run_command(["run"], env, tmp_path)
    assert result.returncode == errors.EX_CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MHC_CB_EVENTS_TOKEN" in lines[0], result.stderr
    expected = "not both" if problem == "both" else "cannot read"
    assert expected in lines[0] and "tok-from" not in lines[0]
    assert not (tmp_path / "data").exists(), "nothing may start before the configuration is valid"


def test_credentials_reload_reads_rotated_files_and_keeps_a_good_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without_mhc(monkeypatch, tmp_path)
    token_file = tmp_path / "events"
    token_file.write_text("first-token-value")
    monkeypatch.setenv("MHC_CB_EVENTS_TOKEN_FILE", str(token_file))
    tokens = credentials.Credentials(config.load())
    current = tokens.provider("cb_events_token")
    assert current() == "first-token-value"
    token_file.write_text("second-token-value\n")
    assert tokens.reload() == ["cb_events_token"]
    assert current() == "second-token-value"
    for broken in ("", None):  # a half-written rotation (empty), then a removed file: the token stays
        if broken is None:
            token_file.unlink()
        else:
            token_file.write_text(broken)
        assert tokens.reload() == []
        assert current() == "second-token-value"
    assert logs.mask("first-token-value and second-token-value") == f"{logs.MASK} and {logs.MASK}"
