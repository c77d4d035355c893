"""`minidiff bench` smoke tests: the structure of the printed rows and of --json, not the speed.

Tiny preset, batch 2, one repeat, no warm-up: a few seconds, most of it importing torch/diffusers.
"""

import json
import math

import pytest

from minidiff import bench, bench_timing
from minidiff.backend import gpu_available

WHATS = ["train step (ms)", "sample step (ms)", "train peak memory (MB)", "sample peak memory (MB)"]
FAST = dict(preset="tiny", batch=2, repeats=1, warmup=0, log=lambda *a: None)


def parse_table(text: str) -> list[list[str]]:
    """The table lines of the bench output, split into the 7 columns (what has spaces: split from the right)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["what"])
    assert lines[start].split() == list(bench.COLUMNS)
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("wrote "):
            break
        head, *tail = line.rsplit(None, 6)
        rows.append([head.strip(), *tail])
    return rows


def check_rows(rows, with_torch: bool):
    assert [r["what"] for r in rows] == WHATS
    for r in rows:
        assert (r["device"], r["preset"], r["batch"], r["image_size"], r["dtype"]) == ("cpu", "tiny", 2, 8, "float32")
        assert isinstance(r["minidiff"], float) and r["minidiff"] > 0
        torch_measured = with_torch and "ms" in r["what"]  # PyTorch's CPU memory is not measured
        if torch_measured:
            assert r["torch"] > 0 and math.isclose(r["ratio"], r["minidiff"] / r["torch"])
        else:
            assert r["torch"] is None and r["ratio"] is None


def test_bench_rows_without_torch():
    rows = bench.run_bench(**FAST, use_torch=False)
    check_rows(rows, with_torch=False)
    table = parse_table(bench.format_rows(rows))
    assert [t[0] for t in table] == WHATS
    for t, r in zip(table, rows):
        assert t[1:5] == ["cpu", "tiny", "2", f"{r['minidiff']:.1f}"]
        assert t[5:] == ["-", "-"]


def test_bench_rows_with_torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    notes, before = [], torch.get_num_threads()
    try:
        rows = bench.run_bench(**{**FAST, "log": notes.append}, use_torch=True, threads=1)
        assert torch.get_num_threads() == 1  # --threads reaches PyTorch
    finally:
        torch.set_num_threads(before)
    check_rows(rows, with_torch=True)
    check = [n for n in notes if "same network check" in n]
    assert check and float(check[0].rsplit("= ", 1)[1]) < 1e-4  # the two sides run the same network
    table = parse_table(bench.format_rows(rows))
    for t, r in zip(table[:2], rows[:2]):
        assert float(t[5]) == pytest.approx(r["torch"], abs=0.051)
        assert float(t[6]) == pytest.approx(r["ratio"], abs=0.0051)


def test_bench_cli_prints_rows_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--no-torch",
            "--clock", "cpu", "--threads", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    table = parse_table(printed)
    assert [t[0] for t in table] == WHATS
    saved = json.loads(out.read_text())
    assert [r["what"] for r in saved["rows"]] == WHATS
    assert all(r["clock"] == "cpu" and r["torch"] is None for r in saved["rows"])
    assert [f"{r['minidiff']:.1f}" for r in saved["rows"]] == [t[4] for t in table]


def test_bench_subparser_registers():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--preset", "small", "--threads", "2", "--no-torch"])
    assert (args.command, args.preset, args.threads, args.no_torch, args.func) == ("bench", "small", 2, True,
                                                                                  bench.cmd_bench)
    assert (args.batch, args.device, args.dtype, args.image_size, args.clock) == (64, "cpu", "float32", None, "wall")


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--threads", "0"], "--threads must be an integer >= 1"),
    (["--image-size", "7"], "--image-size must be a multiple of 2 for preset 'tiny'"),
    (["--clock", "cpu", "--threads", "2"], "--clock cpu measures this process's CPU time"),
])
def test_bench_bad_input(argv, message, capsys):
    assert bench.main(["--preset", "tiny", "--no-torch", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line


def test_bench_gpu_missing_is_one_line(capsys):
    if gpu_available():
        pytest.skip("a GPU is available here")
    assert bench.main(["--preset", "tiny", "--device", "gpu", "--no-torch"]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "CuPy" in err and err.count("\n") == 1
    assert bench.main(["--preset", "tiny", "--clock", "cpu", "--device", "gpu"]) == 2
    assert "--device cpu only" in capsys.readouterr().err



def test_rounds_alternate_the_sides_block_by_block():
    calls = []

    class Side:
        def __init__(self, name):
            self.name = name

        def sync(self):
            pass

        def train_step(self):
            calls.append(self.name)

    clock = iter(range(100))
    times = bench_timing.alternating_ms([Side("md"), Side("th")], "train_step", warmup=1, repeats=2, rounds=3,
                                  timer=lambda: next(clock))
    assert calls == ["md"] * 3 + ["th"] * 3 + ["md"] * 3 + ["th"] * 3 + ["md"] * 3 + ["th"] * 3
    assert times == [[[1e3, 1e3]] * 3] * 2  # [side][round][repeat]: each timed step spans one tick


def test_rounds_in_the_rows_and_bad_rounds(capsys):
    rows = bench.run_bench(**{**FAST, "repeats": 2}, rounds=2, use_torch=False, memory=False)
    assert [r["rounds"] for r in rows] == [2, 2]
    for r in rows:
        (per_round,) = r["rounds_ms"]  # minidiff only
        assert len(per_round) == 2 and min(per_round) <= r["minidiff"] <= max(per_round)
    assert bench.main(["--preset", "tiny", "--no-torch", "--rounds", "0"]) == 2
    assert "--rounds must be an integer >= 1" in capsys.readouterr().err
