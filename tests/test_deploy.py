"""deploy/: the systemd unit passes systemd's own checks, the Dockerfile lints clean, the env example is true.

The tools (Debian's systemd, hadolint from the dev extras) are skipped when absent on a developer's machine
and required in CI, where .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "mhc-daemon.service"
ENV_EXAMPLE = ROOT / "deploy" / "mhc-daemon.env.example"
MAX_EXPOSURE = 2.0


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run must install it")
        pytest.skip(f"{name} is not installed here")
    return found


def _unit_settings() -> list[tuple[str, str, str]]:
    """(section, key, value) for every line of the unit; systemd allows a key more than once."""
    section, found = "", []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def _values(key: str) -> list[str]:
    return [value for section, name, value in _unit_settings() if section == "Service" and name == key]


def test_unit_keeps_its_contract_with_the_daemon() -> None:
    assert _values("Type") == ["notify"]
    assert _values("NotifyAccess") == ["main"]
    assert _values("RestartPreventExitStatus") == ["78"]
    assert _values("Restart") == ["on-failure"]
    assert _values("EnvironmentFile") == ["/etc/mhc-daemon/mhc-daemon.env"]
    assert _values("StateDirectory") == ["mhc-daemon"]
    assert "MHC_DATA_DIR=%S/mhc-daemon" in _values("Environment")
    default_shutdown = config.Settings.model_fields["shutdown_timeout"].default
    (stop_timeout,) = _values("TimeoutStopSec")
    assert float(stop_timeout) > default_shutdown
    (families,) = _values("RestrictAddressFamilies")
    assert set(families.split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    (watchdog,) = _values("WatchdogSec")
    assert int(watchdog) > 0
    assert _values("ExecStart")[0].split()[1:] == ["run"]
    assert _values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    credentials = [value.partition(":")[0] for value in _values("LoadCredential")]
    assert credentials == ["cb_events_token"] and set(credentials) <= set(config.TOKEN_SETTINGS)


def test_unit_verifies_clean(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # A root with the unit, the host's own units (targets it refers to) and the real console script
    # where ExecStart expects it: verify then checks the unit as an installed system would see it.
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system" / UNIT.name)
    script = Path(sys.executable).parent / "mhc-daemon"
    shutil.copy(script, tmp_path / "usr/local/bin/mhc-daemon")
    # ExecReload's /bin/kill, laid out as a merged-/usr system has it.
    (tmp_path / "usr/bin").mkdir()
    shutil.copy(shutil.which("kill") or "/usr/bin/kill", tmp_path / "usr/bin/kill")
    (tmp_path / "bin").symlink_to("usr/bin")
    result = subprocess.run(
        [analyze, "verify", f"--root={tmp_path}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on mere warnings (an unknown key, say): clean means no output at all.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_exposure_is_at_most_two(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for mhc-daemon\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stderr


def test_dockerfile_lints_clean() -> None:
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_env_example_names_every_setting_and_only_settings() -> None:
    names = set(re.findall(r"^#?(MHC_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    fields = {config.ENV_PREFIX + name.upper() for name in config.Settings.model_fields}
    assert names == fields


def test_env_example_loads_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    settings = config.load(_env_file=ENV_EXAMPLE)
    assert settings.cb_username == "your_broadcaster_name"
    assert settings.cb_events_token is None, "tokens are credentials or files, not lines of the env file"
    assert settings.health_host == "127.0.0.1"
