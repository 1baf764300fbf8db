"""How deeply JSON may nest: one limit for every value the daemon decodes from an API and stores.

Depth counts containers: a scalar is 0, `[]` and `{}` are 1, `{"a": [1]}` is 2.
"""

from __future__ import annotations

from typing import Any

# orjson encodes at most 254 nested containers (255 raise) and decodes at most 1024; the standard library
# recurses once per level both ways (RecursionError near 1,000, sooner on a deeper stack). At orjson's own
# encoding limit the fast path (orjson refuses) and the slow path (`deeper_than`) draw the same line, and
# every value within it re-encodes with either library, asyncpg's jsonb codec included, far from any
# recursion limit. tests/test_ingest.py checks the orjson boundary, so an upgrade that moves it is noticed.
MAX_DEPTH = 254


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests more than `limit` containers deep. Iterative: any depth is safe to ask about."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
