"""The docs cannot rot: every ```python block of docs/**/*.md and README.md runs, and every code
reference in them points at the line it names.

Code blocks: each file's blocks run in order, in one namespace, in a fresh temporary folder.
    ```python           runs
    ```python torch     runs only where torch and diffusers import (otherwise the file is skipped)
    ```python no-run    never runs (keep these rare: output listings, pseudo-code)
References: `name` (minidiff/file.py:N) must have a definition of name's last dotted part (a def,
a class, or an assignment target, found with ast: docstrings and comments never count) on line N
or one of the 3 lines after it, inside the functions/classes that the other parts name: `add_noise`,
`schedule.add_noise` (a leading module name is dropped), `ddpm_step.mean` (`mean` assigned inside
ddpm_step), `Trainer.train_step`. tests/test_x.py::test_y must name an existing test function.

After code moves, `python tests/test_docs.py --fix` rewrites each line number to the line of the
nearest matching definition in the named scope (and reports the references it cannot resolve).
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md")) + ([ROOT / "README.md"] if (ROOT / "README.md").exists() else [])
FENCE = re.compile(r"^```python(?P<info>[^\n`]*)$")
REF = re.compile(r"`(?P<name>[A-Za-z_][\w.]*)(?:\(\))?`\s*\((?P<path>minidiff/[\w/]+\.py):(?P<line>\d+)\)")
ANY_REF = re.compile(r"minidiff/[\w/]+\.py:\d+")
TEST_REF = re.compile(r"(?P<path>tests/(?:\w+/)*test_\w+\.py)::(?P<name>test_\w+)")
WINDOW = 3  # the definition may sit this many lines below the referenced line


def code_blocks(text: str) -> list:
    """[(first line number, info words, source)] of the ```python blocks, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            assert not lines[i].lstrip().startswith("```python"), f"line {i + 1}: indented ```python fence"
            i += 1
            continue
        start, i = i + 1, i + 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        assert i < len(lines), f"line {start}: ```python block is never closed"
        blocks.append((start + 1, m.group("info").split(), "\n".join(lines[start:i])))
        i += 1
    return blocks


@functools.lru_cache(maxsize=None)
def _definitions(path: Path, mtime: float) -> tuple:
    out = []

    def visit(node, enclosing):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((child.lineno, child.name, enclosing))
                visit(child, enclosing + (child.name,))
                continue
            targets = (child.targets if isinstance(child, ast.Assign) else
                       [child.target] if isinstance(child, (ast.AugAssign, ast.AnnAssign, ast.For)) else [])
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        out.append((child.lineno, sub.id, enclosing))
            visit(child, enclosing)

    visit(ast.parse(path.read_text()), ())
    return tuple(out)


def definitions(path: Path) -> tuple:
    """((line, name, enclosing), ...) for every def, class and assignment target of a Python file;
    enclosing holds the names of the classes/functions around it, outermost first. Parsed with ast,
    so a docstring or a comment that reads like an assignment never counts."""
    return _definitions(path, path.stat().st_mtime)


def matches(ref_name: str, path: Path) -> list:
    """Lines that define ref_name's last part inside the scopes its other parts name."""
    parts = ref_name.split(".")
    if len(parts) > 1 and parts[0] == path.stem:
        parts = parts[1:]  # schedule.add_noise in minidiff/diffusion/schedule.py
    *scopes, name = parts
    return sorted(line for line, n, enclosing in definitions(path) if n == name and all(s in enclosing for s in scopes))


def check_refs(text: str, root: Path = ROOT) -> list:
    """Error messages for the stale or malformed references of one document's text."""
    errors = []
    named = list(REF.finditer(text))
    spans = [m.span("path") for m in named]
    for m in ANY_REF.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            errors.append(f"{m.group()}: write references as `name` ({m.group()}) so the name can be checked")
    for m in named:
        path, line = root / m.group("path"), int(m.group("line"))
        if not path.exists():
            errors.append(f"{m.group()}: {m.group('path')} does not exist")
            continue
        where = matches(m.group("name"), path)
        if not any(line <= n <= line + WINDOW for n in where):
            errors.append(f"{m.group()}: no definition of {m.group('name')!r} at lines {line}-{line + WINDOW} "
                          f"of {m.group('path')} (it is defined at {where or 'no line'})")
    for m in TEST_REF.finditer(text):
        path = root / m.group("path")
        if not path.exists() or not re.search(rf"^def {m.group('name')}\b", path.read_text(), re.M):
            errors.append(f"{m.group()}: no such test")
    return errors


def fix_refs(doc: Path) -> list:
    """Point every reference of doc exactly at its definition line (the nearest one in scope), in place;
    returns notes on what changed."""
    text, notes = doc.read_text(), []

    def repl(m):
        path, line = ROOT / m.group("path"), int(m.group("line"))
        if not path.exists():
            return m.group()
        where = matches(m.group("name"), path)
        if line in where:
            return m.group()
        if not where:
            notes.append(f"{doc.name}: cannot resolve {m.group()}")
            return m.group()
        new = min(where, key=lambda n: abs(n - line))
        notes.append(f"{doc.name}: {m.group('path')}:{line} -> {new} ({m.group('name')})")
        return m.group().replace(f"{m.group('path')}:{line}", f"{m.group('path')}:{new}")

    doc.write_text(REF.sub(repl, text))
    return notes


def _has_torch() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_code_blocks_run(doc, tmp_path, monkeypatch):
    blocks = [b for b in code_blocks(doc.read_text()) if "no-run" not in b[1]]
    if any("torch" in info for _, info, _ in blocks) and not _has_torch():
        pytest.skip(f"{doc.name} has ```python torch blocks and torch/diffusers are not installed")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"doc:{doc.name}"}
    for start, _, src in blocks:
        # pad with newlines so that a traceback names the line of the .md file
        exec(compile("\n" * (start - 1) + src, str(doc), "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_code_references_point_at_their_lines(doc):
    errors = check_refs(doc.read_text())
    assert not errors, "stale references (python tests/test_docs.py --fix repairs line numbers):\n" + "\n".join(errors)


def test_reference_checker_catches_stale_lines(tmp_path):
    (tmp_path / "minidiff").mkdir()
    (tmp_path / "minidiff" / "m.py").write_text(
        'import x\n\n\n\n\ndef f(a):\n    """y = a docstring"""\n    y = a + 1\n    return y == 2\n\n\n'
        "def g():\n    y = 3  # another y\n")
    assert check_refs("`m.f` (minidiff/m.py:6), `f.y` (minidiff/m.py:5), `g.y` (minidiff/m.py:13)", tmp_path) == []
    assert "defined at [6]" in check_refs("`m.f` (minidiff/m.py:2)", tmp_path)[0]  # 6 > 2 + WINDOW
    assert "defined at [8]" in check_refs("`f.y` (minidiff/m.py:9)", tmp_path)[0]  # y == 2 is no definition
    assert "defined at [13]" in check_refs("`g.y` (minidiff/m.py:7)", tmp_path)[0]  # g's y: not f's, not the docstring
    assert "does not exist" in check_refs("`g` (minidiff/nope.py:1)", tmp_path)[0]
    assert "write references as" in check_refs("see minidiff/m.py:4", tmp_path)[0]
    assert check_refs("tests/test_docs.py::test_no_such_test")[0].endswith("no such test")
    assert code_blocks("a\n```python torch\nx = 1\n```\n```python\ny = 2\n```\n") == [(3, ["torch"], "x = 1"),
                                                                                     (6, [], "y = 2")]


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        for d in DOCS:
            for note in fix_refs(d):
                print(note)
    else:
        print(__doc__)
