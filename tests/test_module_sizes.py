"""Files stay small (/work CONVENTIONS, docs/conventions.md: no module over ~300 lines, nanoGPT's model and train
~300 each): every module of minidiff/ holds at most MAX_LINES lines, but those named in OVER, each with its reason.
A module that grows past it gives a coherent piece to a module named after what that piece does."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 300
OVER: dict[str, str] = {}  # module -> why it may be longer (none today)


def test_no_module_is_over_300_lines():
    over = {}
    for path in sorted((ROOT / "minidiff").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and name not in OVER:
            over[name] = n
    assert not over, f"modules over {MAX_LINES} lines: {over}"
