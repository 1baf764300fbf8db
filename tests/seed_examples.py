"""The seed document's JSON examples, read in place (never copied into the project)."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.conftest import shared_path


def json_blocks_under(heading: str) -> list[Any]:
    """The ```json blocks of the seed section whose heading line contains `heading`, in order."""
    text = shared_path("seed", "database-schema.md").read_text(encoding="utf-8")
    start = next(m.end() for m in re.finditer(r"^#+ .*$", text, re.MULTILINE) if heading in m.group(0))
    following = re.search(r"^#+ ", text[start:], re.MULTILINE)
    section = text[start : start + following.start()] if following else text[start:]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.DOTALL)]
