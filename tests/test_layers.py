"""The layers of DESIGN.md: import-linter's contracts ([tool.importlinter] in pyproject.toml) hold, and the
reference path (diffusion/, nn/, model/) reads no environment variable, branches on no speed switch and
imports nothing from fast/ (not even lazily, inside a function, where import-linter also looks).

The second test walks the syntax tree, so a comment or a docstring that names FUSED or os.environ is fine;
code that uses them is not.
"""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIRS = ("minidiff/diffusion", "minidiff/nn", "minidiff/model")


def test_import_contracts_hold():
    """`lint-imports` from the repository root: layers, forbidden imports, no cycles."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    exe = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from importlinter.cli import "
                                                                   "lint_imports_command as c; sys.exit(c())"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd + ["--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, f"lint-imports failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"


def _dotted(node):
    """'os.environ' for the expression os.environ; None for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _package_of(path):
    """The package a file's relative imports start from: 'minidiff.nn' for minidiff/nn/conv2d.py and for
    minidiff/nn/__init__.py."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imported(node, package):
    """The absolute names one import statement brings in, relative imports resolved against `package`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1] if node.level else []
    prefix = ".".join(base + ([node.module] if node.module else []))
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def reference_path_violations():
    """Every use of os.environ / getenv / putenv, of a FUSED name, or an import of minidiff.fast, as 'file:line: what'."""
    found = []
    for top in REFERENCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            package = _package_of(path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = _imported(node, package)
                    if any(n == "minidiff.fast" or n.startswith("minidiff.fast.") for n in names):
                        found.append(f"{where}: imports fast/ ({', '.join(names[:1])})")
                    if isinstance(node, ast.ImportFrom) and names[0] == "os" and any(
                            a.name in ("environ", "getenv", "putenv", "environb") for a in node.names):
                        found.append(f"{where}: imports the environment from os")
                elif isinstance(node, (ast.Attribute, ast.Name)):
                    name = _dotted(node) or ""
                    last = name.rsplit(".", 1)[-1]
                    if name in ("os.environ", "os.getenv", "os.putenv", "os.environb"):
                        found.append(f"{where}: reads the environment ({name})")
                    elif "FUSED" in last.upper():
                        found.append(f"{where}: a speed switch ({name})")
                elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "__import__"):
                    arg = node.args[0] if node.args else None
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "fast" in arg.value:
                        found.append(f"{where}: imports fast/ dynamically ({arg.value})")
    return sorted(set(found), key=lambda v: (v.split(":")[0], int(v.split(":")[1])))


def test_reference_path_has_no_speed_switch():
    found = reference_path_violations()
    assert not found, "the reference path (diffusion/, nn/, model/) must not read the environment, branch on " \
                      "a speed switch or import fast/:\n" + "\n".join(found)


def test_the_walk_catches_what_it_looks_for(tmp_path, monkeypatch):
    """The checker itself: code is caught, comments and strings are not (so the test above can fail)."""
    pkg = tmp_path / "minidiff" / "nn"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "import os\n"
        "from .. import backend\n"
        "from ..fast.cuda import im2col\n"  # line 3
        "# os.environ and FUSED in a comment are fine\n"
        "'''backend.FUSED in a docstring is fine'''\n"
        "def f():\n"
        "    from minidiff.fast import ops\n"  # line 7
        "    if backend.FUSED:\n"  # line 8
        "        return os.environ.get('X')\n"  # line 9
        "    return os.getenv('Y')\n",  # line 10
        encoding="utf-8")
    (pkg / "__init__.py").write_text("from ..fast import flat\n", encoding="utf-8")  # line 1
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "REFERENCE_DIRS", ("minidiff/nn",))
    lines = {v.split(": ", 1)[0] for v in reference_path_violations()}
    where = {f"{p}:{n}" for p, n in [("minidiff/nn/__init__.py", 1)] + [("minidiff/nn/bad.py", n) for n in (3, 7, 8, 9, 10)]}
    assert {w.replace("/", os.sep) for w in where} == lines
