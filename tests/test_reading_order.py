"""docs/reading-order.md cannot rot: it lists every minidiff file that one training step and one sampling
step run on the reference path, with each file's true line count, and that path stays under 1,000 lines.

The trace (sys.settrace, distinct executed lines per file under minidiff/) runs the tiny preset on the
built-in shapes data with text conditioning (the command line's defaults) and the REFERENCE ops table:
    training  Trainer.train_step: draw x0 and the prompts (condition dropout), t and eps; add_noise;
              unet_forward; diffusion_loss; unet_backward; clip_grad_norm; AdamW; EMA   (DDPM Algorithm 1)
    sampling  diffusion.sampler.sample, DDIM, 2 steps, with the classifier-free guided model_fn of
              diffusion.guidance around unet_forward (for_backward=False)             (DDIM + CFG)
Building the Trainer (data, tokenizer, parameters, run folder) is set-up and is not traced.

After a listed file changes length, `python tests/test_reading_order.py --fix` rewrites the page's counts.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reading-order.md"
PACKAGE = ROOT / "minidiff"
MAX_LINES = 1000  # distinct executed lines of the traced steps, all files together (issue 16)
# a table row: | 3 | [`minidiff/diffusion/loss.py`](../minidiff/diffusion/loss.py) | 93 | what to look for |
ROW = re.compile(r"^\|\s*(?P<n>\d+)\s*\|\s*\[`(?P<path>minidiff/[\w/]+\.py)`\]\([^)]*\)\s*\|\s*(?P<lines>\d+)\s*\|")


def page_rows(text: str | None = None) -> list:
    """[(row number, path, line count)] of the page's table, in order."""
    text = PAGE.read_text(encoding="utf-8") if text is None else text
    return [(int(m["n"]), m["path"], int(m["lines"])) for m in map(ROW.match, text.splitlines()) if m]


def line_count(path: str) -> int:
    """Lines of a file, as wc -l counts them for a file that ends with a newline."""
    return len((ROOT / path).read_text(encoding="utf-8").splitlines())


def trace_reference_steps(run_dir) -> dict:
    """{path relative to ROOT: set of executed line numbers} for one Trainer.train_step and one 2-step CFG
    DDIM sample, both with the REFERENCE ops; run_dir: an empty folder for the trainer's run."""
    from minidiff.diffusion.guidance import make_guided_model_fn
    from minidiff.diffusion.sampler import sample
    from minidiff.model.unet import unet_forward
    from minidiff.nn.ops import REFERENCE
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer

    # set-up, not traced: the run as `minidiff train --preset tiny --reference` builds it (shapes data, text)
    trainer = Trainer(TrainConfig(preset="tiny", out=str(Path(run_dir) / "run"), batch_size=4, seed=0),
                      log=lambda *args: None, ops=REFERENCE)
    config, size = trainer.model_config, trainer.model_config.sample_size
    prompts = trainer.tokenizer.encode(["red circle", "large blue square"])  # (2, L)
    null_prompt = trainer.tokenizer.encode([""])[0]  # (L,) the empty prompt: all padding

    def sampling():
        def model_fn(x_t, t, prompts):
            return unet_forward(trainer.ema.shadow, config, x_t, t, context=prompts, for_backward=False,
                                ops=REFERENCE)[0]

        guided = make_guided_model_fn(model_fn, 3.0, null_prompt)
        return sample(guided, (2, config.in_channels, size, size), trainer.schedule, sampler="ddim",
                      num_inference_steps=2, cond=prompts, ops=REFERENCE)

    lines, package = defaultdict(set), str(PACKAGE) + os.sep

    def trace_calls(frame, event, arg):
        filename = frame.f_code.co_filename
        if not filename.startswith(package):
            return None  # numpy, the test itself: not traced line by line

        def trace_lines(frame, event, arg):
            if event == "line":
                lines[filename].add(frame.f_lineno)
            return trace_lines

        return trace_lines

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        loss = trainer.train_step()
        x0 = sampling()
    finally:
        sys.settrace(previous)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(x0))
    return {Path(f).relative_to(ROOT).as_posix(): s for f, s in lines.items()}


def test_page_lists_files_with_their_line_counts():
    rows = page_rows()
    assert rows, f"{PAGE.relative_to(ROOT)} has no table rows like | 1 | [`minidiff/x.py`](../minidiff/x.py) | 42 |"
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1)), "rows must be numbered 1, 2, 3, ..."
    paths = [p for _, p, _ in rows]
    assert len(paths) == len(set(paths)), f"a file is listed twice: {sorted(p for p in paths if paths.count(p) > 1)}"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"listed files that do not exist: {missing}"
    stale = [f"{p}: page says {n}, file has {line_count(p)}" for _, p, n in rows if line_count(p) != n]
    assert not stale, "line counts on the page are stale (python tests/test_reading_order.py --fix):\n" + \
        "\n".join(stale)


def test_traced_reference_steps_stay_on_the_page_and_under_1000_lines(tmp_path):
    traced = trace_reference_steps(tmp_path)
    listed = {p for _, p, _ in page_rows()}
    report = "\n".join(f"{len(s):5d}  {p}" for p, s in sorted(traced.items()))
    total = sum(len(s) for s in traced.values())
    off_page = sorted(set(traced) - listed)
    assert not off_page, f"the reference steps run files that {PAGE.relative_to(ROOT)} does not list: {off_page}\n" \
                         f"distinct lines per file:\n{report}"
    assert total <= MAX_LINES, f"the reference steps execute {total} distinct lines (> {MAX_LINES}):\n{report}"


def test_row_parser_reads_the_table():
    text = ("| # | file | lines | look for |\n|---|---|---|---|\n"
            "| 1 | [`minidiff/diffusion/loss.py`](../minidiff/diffusion/loss.py) | 93 | the loss |\n"
            "not a row | [`minidiff/x.py`](x) | 3 |\n")
    assert page_rows(text) == [(1, "minidiff/diffusion/loss.py", 93)]


def fix_page() -> None:
    """Rewrite each row's line count to its file's."""
    out = []
    for line in PAGE.read_text(encoding="utf-8").splitlines(keepends=True):
        m = ROW.match(line)
        if m and (ROOT / m["path"]).is_file():
            line = line[:m.start("lines")] + str(line_count(m["path"])) + line[m.end("lines"):]
        out.append(line)
    PAGE.write_text("".join(out), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--fix" in sys.argv[1:]:
        fix_page()
    with tempfile.TemporaryDirectory() as folder:
        traced = trace_reference_steps(folder)
    for path, executed in sorted(traced.items()):
        print(f"{len(executed):5d}  {path}")
    print(f"{sum(len(s) for s in traced.values()):5d}  distinct lines in {len(traced)} files")
