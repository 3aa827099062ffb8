"""docs/reliability.md names, row by row, the test that provokes each fault: every test it names must exist.

A reference is `tests/<path>.py::test_name`, optionally followed by `[id]` or `[*]` (parameter ids are not
checked). The test column of every table holds only such full references, so a renamed, moved or deleted test is
caught here, and so is a module path (`neox/....py`) that no longer exists. The check reads the test files with
`ast` (no pytest collection, no imports of the tests).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"

REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)(?:\[[^\]`]*\])?")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SOURCE = re.compile(r"`(neox/[\w/]+\.py)`")  # a module the doc points to


def _defined_tests(path: Path) -> Optional[Set[str]]:
    """The names of the test functions (module level or in a class) a file defines; None if it does not exist."""
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(), str(path))
    return {n.name for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}


def _cells(line: str) -> List[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _is_separator(line: str) -> bool:
    return re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()) is not None


def _test_rows(text: str) -> Iterator[Tuple[int, List[str], int]]:
    """(line number, cells, the header's cell count) for every row of every table whose last column is `test`."""
    width = 0  # of the current test table's header; 0 outside one
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            width = 0
        elif i + 1 < len(lines) and _is_separator(lines[i + 1]):  # a header row
            header = _cells(line)
            width = len(header) if header[-1].lower() == "test" else 0
        elif width and not _is_separator(line):
            yield i + 1, _cells(line), width


def problems(text: str, root: Path) -> List[str]:
    """Every test reference in `text` that names no test under `root`, every test cell not in full form, and
    every module path (`neox/....py`) that does not exist."""
    found: List[str] = []
    files: Dict[str, Optional[Set[str]]] = {}  # each file parsed once per check
    for number, line in enumerate(text.splitlines(), 1):
        for match in REFERENCE.finditer(line):
            path, name = match.group(1), match.group(2)
            if path not in files:
                files[path] = _defined_tests(root / path)
            defined = files[path]
            if defined is None:
                found.append(f"line {number}: {path} does not exist (named for {name})")
            elif name not in defined:
                found.append(f"line {number}: {path} defines no {name}")
        found += [f"line {number}: {m.group(1)} does not exist" for m in SOURCE.finditer(line)
                  if not (root / m.group(1)).is_file()]
    for number, cells, width in _test_rows(text):
        if len(cells) != width:  # an unescaped | inside a cell shifts the test column
            found.append(f"line {number}: {len(cells)} cells, the header has {width}")
            continue
        cell = cells[-1]
        spans = [m.group(2).strip() for m in CODE_SPAN.finditer(cell)]
        if not spans:
            found.append(f"line {number}: the row names no test")
        found += [f"line {number}: `{span}` is not a full reference tests/<path>.py::test_name[...]"
                  for span in spans if not REFERENCE.fullmatch(span)]
    return found


def test_every_test_the_doc_names_exists():
    found = problems(DOC.read_text(), REPO)
    assert not found, "docs/reliability.md names tests or modules that do not exist:\n" + "\n".join(found)


def test_every_table_of_the_doc_is_read():
    """A table the parser misses (another header, a changed layout) would pass unchecked: every section of the
    doc that holds a table must yield test rows."""
    lines = DOC.read_text().splitlines()
    section_of = {}
    section = ""
    for number, line in enumerate(lines, 1):
        section = line if line.startswith("## ") else section
        section_of[number] = section
    with_tables = {section_of[n] for n, line in enumerate(lines, 1) if _is_separator(line)}
    rows = list(_test_rows("\n".join(lines)))
    assert {section_of[n] for n, _, _ in rows} == with_tables
    assert len(rows) > 100, len(rows)


FAKE_TESTS = '''
import pytest

def test_here():
    pass

class TestGroup:
    def test_in_a_class(self):
        pass

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    pass
'''


def _fake_tree(tmp_path: Path) -> Path:
    (tmp_path / "tests" / "a").mkdir(parents=True)
    (tmp_path / "tests" / "a" / "test_x.py").write_text(FAKE_TESTS)
    return tmp_path


def _table(*tests: str) -> str:
    rows = "".join(f"| {i} | a fault | a message | {t} |\n" for i, t in enumerate(tests, 1))
    return "## Faults\n\n| # | fault | what neox does | test |\n|---|---|---|---|\n" + rows + "\nprose after\n"


def test_the_check_accepts_existing_tests_in_full_form(tmp_path):
    root = _fake_tree(tmp_path)
    doc = _table("`tests/a/test_x.py::test_here`",
                 "`tests/a/test_x.py::test_param[*]`, `tests/a/test_x.py::test_param[1]` (slow)",
                 "`tests/a/test_x.py::test_in_a_class`")
    assert problems(doc, root) == []


def test_the_check_fails_on_a_missing_test_or_file(tmp_path):
    root = _fake_tree(tmp_path)
    doc = _table("`tests/a/test_x.py::test_gone`", "`tests/a/test_moved.py::test_here[*]`")
    assert problems(doc, root) == ["line 5: tests/a/test_x.py defines no test_gone",
                                   "line 6: tests/a/test_moved.py does not exist (named for test_here)"]


def test_the_check_fails_on_shorthand_a_row_without_a_test_or_a_broken_row(tmp_path):
    root = _fake_tree(tmp_path)
    doc = _table("`test_x.py::test_here`", "`::test_param[2]`", "`...[1]`", "(none)",
                 "a | b `tests/a/test_x.py::test_here`")
    assert problems(doc, root) == [
        "line 5: `test_x.py::test_here` is not a full reference tests/<path>.py::test_name[...]",
        "line 6: `::test_param[2]` is not a full reference tests/<path>.py::test_name[...]",
        "line 7: `...[1]` is not a full reference tests/<path>.py::test_name[...]",
        "line 8: the row names no test",
        "line 9: 5 cells, the header has 4"]


def test_only_the_test_column_of_a_test_table_is_held_to_the_form(tmp_path):
    root = _fake_tree(tmp_path)
    doc = ("| name | meaning |\n|---|---|\n| `x` | `y` |\n\n" + _table("`tests/a/test_x.py::test_here`")
           + "\nIn prose `pytest tests/a` is fine, a reference in prose is checked: `tests/a/test_x.py::test_nope`.\n")
    assert problems(doc, root) == ["line 13: tests/a/test_x.py defines no test_nope"]


def test_the_check_fails_on_a_module_that_moved(tmp_path):
    root = _fake_tree(tmp_path)
    (root / "neox").mkdir()
    (root / "neox" / "here.py").write_text("")
    doc = "Guards in `neox/here.py` and `neox/gone.py`.\n" + _table("`tests/a/test_x.py::test_here`")
    assert problems(doc, root) == ["line 1: neox/gone.py does not exist"]
