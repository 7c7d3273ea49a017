"""Safe writing: temporary file renamed into place, usual permissions, no silent overwrite."""

from __future__ import annotations

import os
import stat

import pytest

from promptcli.errors import InputError
from promptcli.io.fileio import (
    atomic_path,
    check_input_file,
    check_output_path,
    open_regular,
    write_text_atomic,
)


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


def test_an_output_checked_to_be_new_is_not_replaced_if_another_command_wrote_it_meanwhile(tmp_path):
    """Two runs of a sweep given one -o: each checked that it did not exist; the second to finish is refused."""
    out = tmp_path / "n.csv"
    check_output_path(out, force=False)
    out.write_text("the other command's labels\n")  # finished first
    with pytest.raises(InputError, match="another command wrote it while this one ran"):
        write_text_atomic(out, "mine\n")
    assert out.read_text() == "the other command's labels\n"
    assert [p.name for p in tmp_path.iterdir()] == ["n.csv"]  # no temporary file left
    out.unlink()
    check_output_path(out, force=False)
    write_text_atomic(out, "mine\n")
    write_text_atomic(out, "mine, rewritten\n")  # once written, the output is this command's own
    assert out.read_text() == "mine, rewritten\n"
    check_output_path(out, force=True)
    write_text_atomic(out, "forced\n")
    assert out.read_text() == "forced\n"


def test_a_dangling_symbolic_link_is_an_existing_output(tmp_path):
    link = tmp_path / "p.safetensors"
    link.symlink_to(tmp_path / "elsewhere" / "p.safetensors")
    with pytest.raises(InputError, match="output exists"):
        check_output_path(link, force=False)


def test_refused_placement_says_where_the_work_stays_and_the_check_follows_the_real_path(
    tmp_path, monkeypatch
):
    from promptcli.io.fileio import OutputTaken, forget_new_outputs, place_output

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    check_output_path(tmp_path / "link" / "p.st", force=False)  # checked through one spelling ...
    (real / "p.st").write_text("the other command's\n")
    tmp = real / ".p.st.tmp"
    tmp.write_text("mine\n")
    with pytest.raises(OutputTaken) as taken:  # ... placed through another
        place_output(tmp, real / "p.st", kept=real / "p.st.partial")
    assert "rerun with --resume --force" in taken.value.hint and "p.st.partial" in taken.value.hint
    assert (real / "p.st").read_text() == "the other command's\n"
    forget_new_outputs()  # a new command of this process: nothing checked yet
    place_output(tmp, real / "p.st")
    assert (real / "p.st").read_text() == "mine\n"


def test_a_link_that_nfs_made_before_answering_eexist_is_placed(tmp_path, monkeypatch):
    from promptcli.io import fileio

    real_link = os.link

    def retried(source, target):  # the first reply was lost; the retry finds the link it made
        real_link(source, target)
        raise FileExistsError(17, "File exists")

    monkeypatch.setattr(fileio.os, "link", retried)
    out = tmp_path / "n.csv"
    check_output_path(out, force=False)
    write_text_atomic(out, "mine\n")
    assert out.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["n.csv"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_open_regular_refuses_what_would_block_or_never_end(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # no writer: a plain open() would wait for one
    for path, kind in ((tmp_path / "pipe", "a FIFO"), ("/dev/zero", "a device"), (tmp_path, "a folder")):
        with pytest.raises(OSError, match=rf"^not a regular file \({kind}\)$"):
            open_regular(path)
    (tmp_path / "f").write_bytes(b"abc")
    with open_regular(tmp_path / "f") as handle:
        assert handle.read() == b"abc"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_input_that_is_no_regular_file_is_named_as_what_it_is_not_as_not_found(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path, kind in ((tmp_path / "pipe", "a FIFO"), ("/dev/zero", "a device"), (tmp_path, "a folder")):
        with pytest.raises(InputError, match=rf"^{path}: pairs file is {kind}, not a regular file"):
            check_input_file(path, "pairs file")
    with pytest.raises(InputError, match="pairs file not found"):
        check_input_file(tmp_path / "missing.csv", "pairs file")
    (tmp_path / "f.csv").write_text("from,to\n")
    assert check_input_file(tmp_path / "f.csv") == tmp_path / "f.csv"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_commands_name_a_fifo_or_folder_given_as_an_input_file(tmp_path, run_cli):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\na.png,cat\nb.png,dog\n")
    out = str(tmp_path / "o.csv")
    for args, message in (
        (
            ["corrupt", labels, "-o", out, "--type", "pair", "--pairs", tmp_path / "folder", "--rate", "0.1"],
            "folder: pairs file is a folder, not a regular file",
        ),
        (
            [
                "corrupt",
                labels,
                "-o",
                out,
                "--type",
                "matrix",
                "--matrix",
                tmp_path / "pipe",
                "--rate",
                "0.1",
            ],
            "pipe: matrix file is a FIFO, not a regular file",
        ),
        (
            ["corrupt", labels, "-o", out, "--rate", "0.1", "--classnames", tmp_path / "folder"],
            "folder: class-name file is a folder, not a regular file",
        ),
        (
            ["corrupt", tmp_path / "pipe", "-o", out, "--rate", "0.1"],
            "pipe: labels file is a FIFO, not a regular file",
        ),
        (["report", tmp_path / "pipe"], "pipe: result file is a FIFO, not a regular file"),
    ):
        code, _, stderr = run_cli(*map(str, args))
        assert code == 2 and message in stderr and "not found" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
