"""Safe writing: temporary file renamed into place, usual permissions, no silent overwrite."""

from __future__ import annotations

import os
import stat

import pytest

from promptcli.errors import InputError
from promptcli.io.fileio import atomic_path, check_output_path, write_text_atomic


def test_atomic_write_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "out.csv"
        write_text_atomic(target, "a,b\n")
    finally:
        os.umask(old)
    assert target.read_text() == "a,b\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("precious")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_check_output_path(tmp_path):
    existing = tmp_path / "x.h5"
    existing.write_text("")
    with pytest.raises(InputError, match="--force"):
        check_output_path(existing, force=False)
    assert check_output_path(existing, force=True) == existing
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "x.h5", force=False)
    with pytest.raises(InputError, match="directory"):
        check_output_path(tmp_path, force=True)
