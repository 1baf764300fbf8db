"""All SQL is parameterized: no statement is built from runtime values, in Python or in the SQL files.

The scan reads the daemon's source with `ast`: a query handed to asyncpg must be a constant, a named query
from sql/queries.sql, or a name bound to one; and no f-string, `%` or `.format()` anywhere may build text that
looks like SQL. The only exceptions are listed in ALLOWED with the reason: identifiers that are constants.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERY_METHODS = frozenset(
    {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor", "copy_from_query"}
)
SQL_WORDS = re.compile(
    r"\b(SELECT\b.+\bFROM|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX|DATABASE)|"
    r"DROP\s+(TABLE|DATABASE)|ALTER\s+TABLE|TRUNCATE)\b",
    re.IGNORECASE | re.DOTALL,
)
# (file, enclosing function) → why the built SQL is safe. Keep this list short and every entry justified.
ALLOWED = {
    ("daemon/demo.py", "_report"): "table names from a fixed tuple in the same expression, never input",
}


@dataclass(frozen=True)
class Finding:
    path: str
    function: str
    line: int
    what: str


def _is_built(node: ast.expr) -> bool:
    """An f-string with values, `%` formatting, concatenation or `.format()`: text made at run time."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    )


def _constant_text(node: ast.expr) -> str:
    """The literal parts of a built string (what a reader sees of the statement)."""
    return " ".join(
        child.value
        for child in ast.walk(node)
        if isinstance(child, ast.Constant) and isinstance(child.value, str)
    )


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.function = "<module>"
        self.findings: list[Finding] = []

    def _enter(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    visit_FunctionDef = _enter  # ast.NodeVisitor's naming
    visit_AsyncFunctionDef = _enter

    def _report(self, node: ast.AST, what: str) -> None:
        if (self.path, self.function) not in ALLOWED:
            self.findings.append(Finding(self.path, self.function, getattr(node, "lineno", 0), what))

    def visit_Call(self, node: ast.Call) -> None:  # ast.NodeVisitor's naming
        query_call = isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_METHODS
        if query_call and node.args and _is_built(node.args[0]):
            self._report(node, "a query method given a statement built at run time")
        if _is_built(node) and SQL_WORDS.search(_constant_text(node)):
            self._report(node, ".format() building SQL")
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        if _is_built(node) and SQL_WORDS.search(_constant_text(node)):
            self._report(node, "an f-string that builds SQL")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if _is_built(node) and SQL_WORDS.search(_constant_text(node)):
            self._report(node, "% or + building SQL")
        self.generic_visit(node)


def scan_source(source: str, path: str) -> list[Finding]:
    scanner = _Scanner(path)
    scanner.visit(ast.parse(source))
    return scanner.findings


def test_no_python_module_builds_sql_from_runtime_values() -> None:
    files = sorted(ROOT.glob("daemon/**/*.py"))
    assert len(files) > 20
    findings = [
        finding
        for file in files
        for finding in scan_source(file.read_text(encoding="utf-8"), str(file.relative_to(ROOT)))
    ]
    assert findings == []


def test_every_allowed_exception_still_exists() -> None:
    """An allowance for code that is gone would silently allow new code of the same name."""
    for path, function in ALLOWED:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        names = {
            node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert function in names, (path, function)


def test_the_scanner_catches_built_sql() -> None:
    bad = """
async def find(pool, name, table):
    await pool.fetch(f"SELECT * FROM persons WHERE username = '{name}'")
    await pool.execute("DELETE FROM persons WHERE id = %s" % name)
    query = "UPDATE persons SET username = '{}'".format(name)
    await pool.fetchval("SELECT count(*) FROM " + table)
    await pool.fetchrow(query)
"""
    found = scan_source(bad, "daemon/example.py")
    assert [finding.line for finding in found] == [3, 3, 4, 4, 5, 6, 6]
    good = """
async def find(pool, name):
    await pool.fetch(sql_files.query("find_person"), name)
    await pool.fetchval("SELECT count(*) FROM persons WHERE username = $1", name)
    log.info(f"selected {name} from the list")
"""
    assert scan_source(good, "daemon/example.py") == []


def test_sql_files_run_no_dynamic_sql() -> None:
    """PL/pgSQL `EXECUTE` of a built string is the SQL-side injection; none of our files uses it."""
    files = sorted(ROOT.glob("sql/**/*.sql"))
    assert len(files) > 10
    dynamic = re.compile(r"\bEXECUTE\b|\|\|\s*quote_|format\s*\(", re.IGNORECASE)
    offenders = [
        f"{file.relative_to(ROOT)}:{number}"
        for file in files
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1)
        if dynamic.search(line.split("--", 1)[0])
    ]
    assert offenders == []
