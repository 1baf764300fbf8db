"""The API tokens as the running daemon sees them: read at start, read again on SIGHUP and after a 401/403.

A token may come from its variable (`MHC_CB_EVENTS_TOKEN`), a file (`MHC_CB_EVENTS_TOKEN_FILE`) or systemd's
`LoadCredential=cb_events_token:…`. Only files can change while the daemon runs: rewrite one and send
SIGHUP (or let the API reject the old token) and the next request carries the new one. Every value ever
read stays registered as a secret, so an old token is masked too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from daemon import config, errors, logs

log = logs.get_logger(__name__)


class Credentials:
    """The current value of each token setting (empty when unset)."""

    def __init__(self, settings: config.Settings) -> None:
        self._files: dict[str, Path | None] = {
            name: config.token_file(settings, name) for name in config.TOKEN_SETTINGS
        }
        self._values: dict[str, str] = {}
        for name in config.TOKEN_SETTINGS:
            secret = getattr(settings, name)
            self._values[name] = secret.get_secret_value() if secret is not None else ""
            register(self._values[name])

    def __repr__(self) -> str:
        return f"Credentials(files={sorted(name for name, path in self._files.items() if path)})"

    def current(self, name: str) -> str:
        return self._values[name]

    def provider(self, name: str) -> Callable[[], str]:
        """A function returning the token's current value: the clients call it for every request."""
        if name not in self._values:
            raise KeyError(name)
        return lambda: self._values[name]

    def reload(self) -> list[str]:
        """Read every token file again; the names whose value changed. An unreadable or empty file keeps the
        previous value (logged): a half-written rotation must not blank a working token."""
        changed = []
        for name, path in self._files.items():
            if path is None:
                continue
            try:
                value = config.read_token(path, name)
            except errors.ConfigError as error:
                log.error("token_file_unreadable", setting=name, error=str(error))
                continue
            if not value:
                log.error("token_file_empty", setting=name, path=str(path))
                continue
            register(value)
            if value != self._values[name]:
                self._values[name] = value
                changed.append(name)
        return changed


def register(value: str) -> None:
    """Mask `value` (and its URL-quoted form) in every log line, error text and status page from now on."""
    logs.register_secret(value)
    logs.register_secret(quote(value, safe=""))
