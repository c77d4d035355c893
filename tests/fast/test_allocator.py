"""allocator.keep_freed_memory: glibc's malloc keeps freed memory for the next step (CLI only)."""

import platform
import sys
from unittest import mock

import pytest

from minidiff import cli
from minidiff.fast.cpu import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_glibc_accepts_both_thresholds():
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # idempotent


def test_a_no_op_elsewhere():
    with mock.patch.object(allocator.platform, "libc_ver", return_value=("musl", "1.2")):
        assert allocator.keep_freed_memory() is False
    with mock.patch.object(allocator.sys, "platform", "darwin"):
        assert allocator.keep_freed_memory() is False


def test_every_cli_command_sets_it_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info"]) == 0
    assert calls == [1]
    capsys.readouterr()
