"""Commands that need no model start without importing torch (a few tenths of a second, not seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("TORCH=%s\\n" % ("torch" in sys.modules)))
from promptcli.cli.app import main
main(sys.argv[1:])
"""


def _imports_torch(*args: str, cwd=None) -> tuple[bool, subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert "TORCH=" in proc.stderr, proc.stderr
    return "TORCH=True" in proc.stderr, proc


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["tune", "--help"], ["eval", "--help"], ["dataset", "list"]],
    ids=lambda a: " ".join(a),
)
def test_help_and_version_do_not_import_torch(args):
    torch, proc = _imports_torch(*args)
    assert proc.returncode == 0, proc.stderr
    assert not torch


def test_corrupt_on_a_labels_csv_and_report_do_not_import_torch(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"img{i}.png,{'ab'[i % 2]}\n" for i in range(20)))
    torch, proc = _imports_torch("corrupt", labels, "--rate", "0.3", "-o", tmp_path / "noisy.csv", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not torch
    summary = tmp_path / "m.json"
    summary.write_text('{"zero_shot": true, "metrics": {"top1": 0.5, "top5": 1.0, "macro_accuracy": 0.5}}')
    torch, proc = _imports_torch("report", summary, "-o", tmp_path / "r.md", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not torch
