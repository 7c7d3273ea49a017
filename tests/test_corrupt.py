"""`promptcli corrupt` and promptcli.noise.corruption: exact flip counts, per-class exactness, few-shot composition,
determinism, confusion mapping, the labels CSV contract through the CLI, and every documented error."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import read_csv_text
from promptcli.errors import InputError
from promptcli.io.features import read_features
from promptcli.io.labels import join_labels, read_labels
from promptcli.noise import corruption as noise

FAST = settings(max_examples=60, deadline=None)
RATES = st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.45, 0.5, 0.6, 0.8, 0.95, 0.99])


@st.composite
def label_sets(draw, min_classes=2, max_classes=8):
    c = draw(st.integers(min_classes, max_classes))
    n = draw(st.integers(1, 120))
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).integers(0, c, size=n)
    return labels, c


def _random_transition(kind: str, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "symmetric":
        return noise.symmetric_transition(c)
    if kind == "pair":
        return noise.pair_transition(c)
    if kind == "confusion":
        return noise.confusion_transition(rng.normal(size=(c, c)))
    t = rng.random((c, c)) * (rng.random((c, c)) < 0.6)  # sparse rows
    np.fill_diagonal(t, 0.0)
    t[np.arange(c), (np.arange(c) + 1) % c] += 0.1  # every row has mass
    return t / t.sum(axis=1, keepdims=True)


def _quota_ok(k: np.ndarray, weights: np.ndarray, total: int) -> bool:
    quota = total * weights / weights.sum()
    return bool(np.all(np.abs(k - quota) < 1 + 1e-9))


@FAST
@given(label_sets(), RATES, st.sampled_from(noise.NOISE_TYPES), st.integers(0, 1000), st.booleans())
def test_exact_flip_counts(data, rate, kind, seed, per_class):
    labels, c = data
    transition = _random_transition(kind, c, seed)
    noisy = noise.corrupt_labels(labels, c, rate, kind, seed, per_class, transition)
    flipped = noisy != labels
    counts = np.bincount(labels, minlength=c)
    per = np.bincount(labels[flipped], minlength=c)
    if per_class:
        assert per.tolist() == [noise.exact_round(rate * n) for n in counts]
    else:
        assert flipped.sum() == noise.exact_round(rate * len(labels))
        assert _quota_ok(per, counts.astype(float), int(flipped.sum()))  # spread in proportion to class size
    # flips land only where the transition allows, and, row by row, in proportion to it (exactly)
    tc = noise.transition_counts(labels, noisy, c)
    targets = noise.flip_targets(transition)
    assert np.all(tc[targets == 0] == np.diag(np.diag(tc))[targets == 0])
    for src in range(c):
        if per[src]:
            assert _quota_ok(np.delete(tc[src], src), np.delete(targets[src], src), int(per[src]))


@FAST
@given(label_sets(), RATES, st.integers(0, 1000))
def test_flipped_labels_never_keep_their_class(data, rate, seed):
    labels, c = data
    noisy = noise.corrupt_labels(labels, c, rate, "symmetric", seed)
    # exactly round(rate*n) changed: none of the chosen samples drew its own label
    assert (noisy != labels).sum() == noise.exact_round(rate * len(labels))
    assert noisy.min() >= 0 and noisy.max() < c


def test_pair_targets_and_rate_zero_identity():
    labels = np.repeat(np.arange(4), 10)
    noisy = noise.corrupt_labels(labels, 4, 0.5, "pair", seed=3)
    changed = noisy != labels
    assert changed.sum() == 20 and np.all(noisy[changed] == (labels[changed] + 1) % 4)
    assert np.array_equal(noise.corrupt_labels(labels, 4, 0.0, "symmetric", seed=3), labels)


def test_partial_pair_mapping_flips_only_mapped_classes():
    labels = np.repeat(np.arange(4), 10)
    t = noise.pair_transition(4, {3: 1, 2: 0})  # CIFAR-style: only some classes have a confusable partner
    noisy = noise.corrupt_labels(labels, 4, 0.4, "pair", seed=0, transition=t)
    tc = noise.transition_counts(labels, noisy, 4)
    assert tc[3, 1] == 4 and tc[2, 0] == 4 and tc[0, 0] == 10 and tc[1, 1] == 10


def test_per_class_rates_from_matrix_diagonal():
    labels = np.repeat(np.arange(3), 20)
    t = np.array([[0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]])
    noisy = noise.corrupt_labels(labels, 3, 1 - np.diag(t), "matrix", seed=1, transition=t)
    tc = noise.transition_counts(labels, noisy, 3)
    assert tc.tolist() == [[16, 4, 0], [0, 20, 0], [5, 5, 10]]


def test_same_seed_same_output():
    labels = np.random.default_rng(0).integers(0, 7, size=500)
    a = noise.corrupt_labels(labels, 7, 0.3, "symmetric", seed=11)
    assert np.array_equal(a, noise.corrupt_labels(labels, 7, 0.3, "symmetric", seed=11))
    assert not np.array_equal(a, noise.corrupt_labels(labels, 7, 0.3, "symmetric", seed=12))
    f1 = noise.few_shot_noisy(labels, 7, 8, 0.5, seed=4)
    f2 = noise.few_shot_noisy(labels, 7, 8, 0.5, seed=4)
    assert np.array_equal(f1.indices, f2.indices) and np.array_equal(f1.clean, f2.clean)


def test_confusion_picks_argmax_off_diagonal_similarity():
    s = np.array(
        [
            [1.0, 0.2, 0.9, 0.1],  # 0 -> 2
            [0.2, 1.0, 0.3, 0.4],  # 1 -> 3
            [0.9, 0.3, 1.0, 0.5],  # 2 -> 0
            [0.1, 0.4, 0.5, 1.0],  # 3 -> 2
        ]
    )
    t = noise.confusion_transition(s)
    assert t.argmax(axis=1).tolist() == [2, 3, 0, 2] and t.sum() == 4
    # the diagonal never wins even when it is not the largest entry
    assert noise.confusion_transition(np.array([[0.0, 5.0], [1.0, 9.0]])).argmax(axis=1).tolist() == [1, 0]
    # few-shot sources: slot j takes the class i != j with the highest score[i, j] (the column)
    a = np.array([[0, 3, 1], [7, 0, 2], [1, 4, 0]], dtype=float)
    assert noise.confusion_sources(a).argmax(axis=1).tolist() == [1, 2, 1]
    labels = np.repeat(np.arange(4), 12)
    noisy = noise.corrupt_labels(labels, 4, 0.5, "confusion", 0, transition=t)
    changed = noisy != labels
    assert np.array_equal(noisy[changed], np.array([2, 3, 0, 2])[labels[changed]])


@st.composite
def shot_cases(draw):
    c = draw(st.integers(2, 6))
    k = draw(st.integers(1, 8))
    extra = draw(st.lists(st.integers(0, 5), min_size=c, max_size=c))
    return c, k, extra


@FAST
@given(shot_cases(), RATES, st.sampled_from(["symmetric", "pair"]), st.integers(0, 1000))
def test_few_shot_composition(case, rate, kind, seed):
    c, k, extra = case
    labels = np.concatenate([np.full(k + e, i) for i, e in enumerate(extra)])
    np.random.default_rng(seed).shuffle(labels)
    fs = noise.few_shot_noisy(labels, c, k, rate, kind, seed)
    m = noise.exact_round(rate * k)
    assert len(np.unique(fs.indices)) == len(fs.indices) == c * k  # no image twice
    assert np.array_equal(fs.clean, labels[fs.indices])
    for j in range(c):
        slot = fs.labels == j
        assert slot.sum() == k and (fs.clean[slot] != j).sum() == m
        if kind == "pair" and m:
            assert set(fs.clean[slot & fs.is_noisy].tolist()) == {(j - 1) % c}
    if kind == "symmetric":  # sources spread evenly; every class gives exactly K images
        assert np.bincount(fs.clean, minlength=c).tolist() == [k] * c
        tc = noise.transition_counts(fs.clean, fs.labels, c)
        off = tc[~np.eye(c, dtype=bool)].reshape(c, c - 1)
        assert off.max() - off.min() <= 1


def test_few_shot_too_few_images_fails_clearly():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 5)
    with pytest.raises(InputError) as exc:
        noise.few_shot_noisy(labels, 3, 8, 0.25, classnames=["a", "b", "c"])
    assert "'c' has 5, needs 8" in exc.value.message and exc.value.where == "--shots"


def test_allocate_is_exact_and_proportional():
    rng = np.random.default_rng(0)
    assert noise.allocate(10, np.array([1.0, 1.0, 2.0]), rng).sum() == 10
    assert noise.allocate(7, np.array([0.0, 3.0, 0.0]), rng).tolist() == [0, 7, 0]
    assert noise.exact_round(0.35 * 10) == 4 and noise.exact_round(0.25 * 2) == 1


def test_read_matrix_labelled_and_bare(tmp_path):
    names = ["a", "b", "c"]
    bare = tmp_path / "bare.csv"
    bare.write_text("0.5,0.5,0\n0,1,0\n0.2,0.3,0.5\n")
    labelled = tmp_path / "lab.csv"
    labelled.write_text(",c,a,b\nb,0,0,1\nc,0.5,0.2,0.3\na,0,0.5,0.5\n")
    np.testing.assert_allclose(
        noise.read_transition_matrix(bare, names), noise.read_transition_matrix(labelled, names)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "0,1e308,1e308\n0.5,0,0.5\n0.5,0.5,0\n",
            ":1: expected 3 numbers in [0, 1]",
        ),  # crashed: fsum overflow
        ("0,1.5,-0.5\n0.5,0,0.5\n0.5,0.5,0\n", ":1: expected 3 numbers in [0, 1]"),
        ("\n\n,a,b,c\n\na,0,0.5,0.5\nb,0.5,0,0.5\nc,0.5,0.5,0.2\n", ":7: row sums to 1.2, not 1"),
        ("0,0.5,0.5\n0," + "5" * 200_000 + ",0\n", "malformed CSV (line 2: field larger than field limit"),
    ],
    ids=["huge", "out-of-range", "blank-lines", "field-limit"],
)
def test_bad_matrix_files_are_input_errors_naming_the_line(tmp_path, text, message):
    matrix = tmp_path / "T.csv"
    matrix.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        noise.read_transition_matrix(matrix, ["a", "b", "c"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "from,to\na,b,c\n",
            ":2: row has 3 fields, the header 2 (a field beyond the named columns holds 'c')",
        ),
        ("from,to\n\n\na,x\n", ":4: unknown class 'x'"),
        ("from,to\n" + "a" * 200_000 + ",b\n", "malformed CSV (line 2: field larger than field limit"),
    ],
    ids=["third-class", "blank-lines", "field-limit"],
)
def test_bad_pair_files_are_input_errors_naming_the_line(tmp_path, text, message):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        noise.read_pairs(pairs, ["a", "b", "c"])
    pairs.write_text("from,to,note\na,b,the usual confusion\n")  # a named column of notes is fine
    assert noise.read_pairs(pairs, ["a", "b", "c"]) == {0: 1}


@pytest.mark.parametrize("other", ["Cat", "cat ", "ca\u0300t", "cat\u00a0", "CAT  "], ids=ascii)
def test_labels_naming_one_class_two_ways_are_refused_without_a_class_list(tmp_path, run_cli, other):
    """Without --features/--classnames the classes are the labels: two spellings of one prompt are refused, not
    made two classes between which a 'flip' changes nothing a prompt can see."""
    labels = tmp_path / "labels.csv"
    base = "c\u00e0t" if other == "ca\u0300t" else "cat"
    labels.write_text(f"path,label\na.png,{base}\nb.png,{base}\nc.png,dog\nd.png,{other}\n", encoding="utf-8")
    code, out, err = run_cli("corrupt", labels, "--rate", "0.5", "-o", tmp_path / "n.csv")
    if other.strip() == base:  # values are stripped: 'cat ' is 'cat'
        assert code == 0, err
        return
    assert code == 2 and f"Error: {labels}: labels " in err and "rename one of the labels" in err
    assert not (tmp_path / "n.csv").exists()


# --- CLI ------------------------------------------------------------------------------------------------


def _write_labels(path, n_per_class=(10, 10, 10), names=("cat", "dog", "fox")):
    rows = ["path,label,split"]
    for name, n in zip(names, n_per_class):
        rows += [f"{name}/{i}.png,{name},train" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_corrupt_csv_with_sidecar(run_cli, tmp_path):
    src = _write_labels(tmp_path / "labels.csv")
    out = tmp_path / "noisy.csv"
    code, stdout, stderr = run_cli("corrupt", src, "--rate", "0.3", "--seed", "0", "-o", out, "--json")
    assert code == 0, stderr
    rows = read_csv_text(out.read_text())
    assert list(rows[0]) == ["path", "label", "split", "clean_label", "is_noisy"]
    assert [r["path"] for r in rows] == [r["path"] for r in read_csv_text(src.read_text())]
    assert all(r["split"] == "train" for r in rows)  # extra columns pass through
    noisy = [r for r in rows if r["is_noisy"] == "1"]
    assert len(noisy) == 9 and all(r["label"] != r["clean_label"] for r in noisy)
    assert all(r["label"] == r["clean_label"] for r in rows if r["is_noisy"] == "0")
    side = json.loads((tmp_path / "noisy.csv.json").read_text())
    assert side == json.loads(stdout)
    assert side["seed"] == 0 and side["type"] == "symmetric" and side["rate"] == 0.3 and side["n_noisy"] == 9
    recount = np.zeros((3, 3), dtype=int)
    idx = {n: i for i, n in enumerate(side["classes"])}
    for r in rows:
        recount[idx[r["clean_label"]], idx[r["label"]]] += 1
    assert side["transition_counts"] == recount.tolist()
    assert [v["flipped_from"] for v in side["per_class_counts"].values()] == [3, 3, 3]
    assert len(side["input_sha256"]) == 64 and side["command"].startswith("promptcli corrupt ")
    from promptcli.io.provenance import command_line

    assert "--json" not in command_line()  # a later library call in this process records its own command
    # same seed, same file; existing outputs are protected
    code, _, stderr = run_cli("corrupt", src, "--rate", "0.3", "-o", out)
    assert code == 2 and "output exists" in stderr
    out2 = tmp_path / "again.csv"
    assert run_cli("corrupt", src, "--rate", "0.3", "-o", out2)[0] == 0
    assert out2.read_text() == out.read_text()


def test_cli_rate_zero_is_identity(run_cli, tmp_path):
    src = _write_labels(tmp_path / "labels.csv")
    code, stdout, _ = run_cli("corrupt", src, "--rate", "0", "-o", "-", "--per-class")
    assert code == 0
    rows = read_csv_text(stdout)
    assert [r["label"] for r in rows] == [r["clean_label"] for r in rows]
    assert {r["is_noisy"] for r in rows} == {"0"}
    # a clean labels CSV made this way can itself be corrupted (columns are refreshed, not duplicated)
    clean = tmp_path / "clean.csv"
    clean.write_text(stdout)
    code, stdout, _ = run_cli("corrupt", clean, "--rate", "0.5", "-o", "-")
    rows = read_csv_text(stdout)
    assert code == 0 and list(rows[0]) == ["path", "label", "split", "clean_label", "is_noisy"]
    assert sum(r["is_noisy"] == "1" for r in rows) == 15


def test_cli_stdin_to_stdout(run_cli, tmp_path, monkeypatch):
    text = _write_labels(tmp_path / "labels.csv", (6, 6, 6)).read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code, stdout, stderr = run_cli(
        "corrupt", "-", "--rate", "0.5", "--type", "pair", "--per-class", "-o", "-"
    )
    assert code == 0, stderr
    rows = read_csv_text(stdout)
    nxt = {"cat": "dog", "dog": "fox", "fox": "cat"}
    noisy = [r for r in rows if r["is_noisy"] == "1"]
    assert len(noisy) == 9 and all(nxt[r["clean_label"]] == r["label"] for r in noisy)
    for name in nxt:
        assert sum(r["clean_label"] == name for r in noisy) == 3
    assert not list(tmp_path.glob("*.json"))


def test_cli_pairs_and_matrix_files(run_cli, tmp_path):
    src = _write_labels(tmp_path / "labels.csv")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("from,to\ncat,fox\nfox,cat\n")
    code, stdout, stderr = run_cli(
        "corrupt", src, "--type", "pair", "--pairs", pairs, "--rate", "0.5", "-o", "-"
    )
    assert code == 0, stderr
    rows = read_csv_text(stdout)
    assert sum(r["is_noisy"] == "1" for r in rows) == 10  # round(0.5 x 20 mapped rows); dog never flips
    assert all(r["label"] == "dog" for r in rows if r["clean_label"] == "dog")
    matrix = tmp_path / "T.csv"
    matrix.write_text(",cat,dog,fox\ncat,0.7,0.3,0\ndog,0,1,0\nfox,0,0.2,0.8\n")
    code, stdout, stderr = run_cli(
        "corrupt", src, "--type", "matrix", "--matrix", matrix, "-o", tmp_path / "m.csv"
    )
    assert code == 0, stderr
    side = json.loads((tmp_path / "m.csv.json").read_text())
    assert side["transition_counts"] == [[7, 3, 0], [0, 10, 0], [0, 2, 8]]


def test_cli_features_input_shots(run_cli, tiny_features, tmp_path):
    out = tmp_path / "noisy16.csv"
    code, stdout, stderr = run_cli(
        "corrupt", tiny_features, "--shots", "4", "--rate", "0.5", "-o", out, "--json"
    )
    assert code == 0, stderr
    fs = read_features(tiny_features, load_views=False)
    rows = read_csv_text(out.read_text())
    assert list(rows[0]) == ["path", "label", "clean_label", "is_noisy"]
    truth = {p: fs.classnames[y] for p, y in zip(fs.paths, fs.labels)}
    assert len({r["path"] for r in rows}) == 12
    for name in fs.classnames:
        slot = [r for r in rows if r["label"] == name]
        assert len(slot) == 4 and sum(r["is_noisy"] == "1" for r in slot) == 2
    assert all(truth[r["path"]] == r["clean_label"] for r in rows)
    assert json.loads(stdout)["shots"] == 4 and "Warning" not in stderr
    joined = join_labels(fs, read_labels(out))  # what tune/eval will do
    assert joined.is_noisy.sum() == 6 and np.array_equal(joined.clean, fs.labels[joined.rows])
    assert np.array_equal(joined.is_noisy, joined.labels != joined.clean)
    # 6 images per class cannot give 8 shots
    code, _, stderr = run_cli(
        "corrupt", tiny_features, "--shots", "8", "--rate", "0.5", "-o", tmp_path / "x.csv"
    )
    assert code == 2 and "too few images for 8 shots" in stderr and "has 6, needs 8" in stderr


def test_classnames_beside_a_features_class_list_must_match_it(run_cli, tiny_features, tmp_path):
    """The features file's class list won and a differing --classnames was dropped without a word."""
    from promptcli.io.features import read_features

    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    out = tmp_path / "o.csv"
    code, _, err = run_cli("corrupt", tiny_features, "--rate", "0.2", "--classnames", names, "-o", out, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{names}: does not list" in err, err
    assert not out.exists()
    names.write_text("\n".join(read_features(tiny_features, load_views=False).classnames) + "\n")
    code, _, err = run_cli("corrupt", tiny_features, "--rate", "0.2", "--classnames", names, "-o", out, "-q")
    assert code == 0 and out.exists(), err  # the same list, in the same order: nothing to refuse


def test_cli_confusion_uses_text_similarity(run_cli, tiny_features, tiny_model, tmp_path):
    from promptcli.models.zeroshot import class_text_embeddings

    fs = read_features(tiny_features, load_views=False)
    w = class_text_embeddings(tiny_model, fs.classnames).numpy()
    sim = w @ w.T
    np.fill_diagonal(sim, -np.inf)
    expected = {fs.classnames[i]: fs.classnames[j] for i, j in enumerate(sim.argmax(axis=1))}
    out = tmp_path / "c.csv"
    code, _, stderr = run_cli(
        "corrupt", tiny_features, "--type", "confusion", "--rate", "0.5", "--device", "cpu", "-o", out
    )
    assert code == 0, stderr
    side = json.loads((tmp_path / "c.csv.json").read_text())
    assert (
        side["confusion"] == expected and side["model"]["checkpoint_sha256"] == tiny_model.checkpoint_sha256
    )
    rows = read_csv_text(out.read_text())
    noisy = [r for r in rows if r["is_noisy"] == "1"]
    assert len(noisy) == 9 and all(expected[r["clean_label"]] == r["label"] for r in noisy)
    code, _, stderr = run_cli(
        "corrupt", tiny_features, "--type", "confusion", "--confusion-from", "predictions", "--rate", "0.5",
        "--device", "cpu", "-o", tmp_path / "p.csv",
    )  # fmt: skip
    assert code == 0, stderr
    side = json.loads((tmp_path / "p.csv.json").read_text())
    conf = np.array(side["zero_shot_confusion"]) + 0.25 * (w @ w.T)
    np.fill_diagonal(conf, -np.inf)
    assert side["confusion"] == {
        fs.classnames[i]: fs.classnames[j] for i, j in enumerate(conf.argmax(axis=1))
    }
    assert np.array(side["zero_shot_confusion"]).sum() == 18


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "1.0"], "--rate: rate must be in [0, 1), got 1"),
        (["--rate", "-0.1"], "--rate: rate must be in [0, 1), got -0.1"),
        ([], "--rate: no noise rate"),
        (["--rate", "0.2", "--type", "bogus"], "--type: unknown value 'bogus'"),
        (["--rate", "0.2", "--type", "confusion"], "--features: --type confusion needs the features file"),
        (["--rate", "0.2", "--type", "matrix"], "--matrix: --type matrix needs --matrix FILE"),
        (["--rate", "0.2", "--pairs", "p.csv"], "--pairs: --pairs applies to --type pair only"),
        (["--rate", "0.2", "--json", "-o", "-"], "-o - and --json both write to stdout"),
    ],
)
def test_cli_option_errors(run_cli, tmp_path, args, message):
    src = _write_labels(tmp_path / "labels.csv")
    argv = ["corrupt", src, *args]
    if "-o" not in args:
        argv += ["-o", tmp_path / "out.csv"]
    code, stdout, stderr = run_cli(*argv)
    assert code == 2 and stderr.startswith("Error: ") and message in stderr, stderr
    assert not (tmp_path / "out.csv").exists()


def test_control_characters_of_user_data_are_escaped_in_errors(run_cli, tmp_path):
    """A class name (or file name) holding ESC, a tab or a newline: the error stays one line, no escape sequence."""
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\na.png,cat\nb.png,fox\n")
    names = tmp_path / "c\nlasses.txt"
    names.write_text("cat\ndo\x1b[31mg\tz\x00\n")
    code, _, err = run_cli(
        "corrupt", labels, "--rate", "0.2", "--classnames", names, "-o", tmp_path / "o.csv"
    )
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err and "\t" not in err and "\x00" not in err
    assert err.startswith(f"Error: {tmp_path}/c\\nlasses.txt: ") or err.startswith(f"Error: {labels}:3: "), (
        err
    )
    assert "do\\x1b[31mg\\tz" in err, err
    assert InputError("a\x1bb", where="x\ny", hint="c\u2028d").message == "x\\ny: a\\x1bb — c\\u2028d"


def test_cli_input_errors(run_cli, tmp_path):
    src = _write_labels(tmp_path / "labels.csv")
    out = str(tmp_path / "o.csv")

    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    code, _, err = run_cli("corrupt", src, "--rate", "0.2", "--classnames", names, "-o", out)
    assert code == 2 and f"{src}:22: label 'fox' is not in the class list" in err

    one = _write_labels(tmp_path / "one.csv", (5,), ("cat",))
    code, _, err = run_cli("corrupt", one, "--rate", "0.2", "-o", out)
    assert code == 2 and "label noise needs at least 2 classes, got 1" in err

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("from,to\ncat,dog\nwolf,cat\n")
    code, _, err = run_cli("corrupt", src, "--rate", "0.2", "--type", "pair", "--pairs", pairs, "-o", out)
    assert code == 2 and f"{pairs}:3: unknown class 'wolf'" in err

    matrix = tmp_path / "T.csv"
    matrix.write_text("0.5,0.5,0\n0,1,0\n0.2,0.3,0.4\n")
    code, _, err = run_cli("corrupt", src, "--type", "matrix", "--matrix", matrix, "-o", out)
    assert code == 2 and f"{matrix}:3: row sums to 0.9, not 1" in err

    zero_diag = tmp_path / "Z.csv"
    zero_diag.write_text("0.5,0.5,0\n0,1,0\n0.5,0.5,0\n")
    code, _, err = run_cli(
        "corrupt", src, "--type", "matrix", "--matrix", zero_diag, "--rate", "0.1", "-o", out
    )
    assert code == 2 and "its diagonal must be 0" in err

    noisy = tmp_path / "noisy.csv"
    noisy.write_text("path,label,clean_label,is_noisy\na.png,cat,dog,1\n")
    code, _, err = run_cli("corrupt", noisy, "--rate", "0.2", "-o", out)
    assert code == 2 and f"{noisy}:2: these labels are already noisy" in err
    assert not (tmp_path / "o.csv").exists()


def test_cli_class_list_from_features(run_cli, tiny_features, tmp_path):
    fs = read_features(tiny_features, load_views=False)
    src = tmp_path / "two.csv"
    src.write_text(
        "path,label\n"
        + "".join(
            f"{p},{fs.classnames[y]}\n"
            for p, y in zip(fs.paths, fs.labels)
            if fs.classnames[y] != "red apple"
        )
    )
    out = tmp_path / "n.csv"
    code, _, stderr = run_cli(
        "corrupt", src, "--features", tiny_features, "--type", "pair", "--rate", "0.5", "-o", out
    )
    assert code == 0, stderr
    side = json.loads((tmp_path / "n.csv.json").read_text())
    assert side["classes"] == fs.classnames and side["features"]["sha256"]
    assert side["transition_counts"] == [
        [3, 3, 0],
        [0, 3, 3],
        [0, 0, 0],
    ]  # green grass -> red apple (not in CSV)
    # without --features the class list is the CSV's own labels: 2 classes, pairs swap
    code, _, stderr = run_cli("corrupt", src, "--type", "pair", "--rate", "0.5", "-o", tmp_path / "m.csv")
    assert code == 0, stderr
    assert json.loads((tmp_path / "m.csv.json").read_text())["transition_counts"] == [[3, 3], [3, 3]]


def test_the_noise_type_registry_and_the_choices_agree():
    from promptcli.choices import NoiseType
    from promptcli.noise.noisy_labels import TRANSITIONS

    assert set(TRANSITIONS) == set(NoiseType.values())


def test_a_rate_that_is_no_whole_number_of_shots_warns(run_cli, tiny_features, tmp_path):
    """--shots 4 --rate 0.125 flips round(0.5) = 1 label of 4 per class: 25%, filed under 0.125 by report."""
    code, _, stderr = run_cli(
        "corrupt", tiny_features, "--shots", "4", "--rate", "0.125", "-o", tmp_path / "n.csv", "--seed", "1"
    )
    assert code == 0, stderr
    assert "realised noise rate 25.0% is not --rate 0.125" in " ".join(stderr.split())


def _outputs(folder) -> dict[str, object]:
    side = json.loads((folder / "n.csv.json").read_text())
    for key in ("created", "command", "output", "output_sha256"):
        side.pop(key, None)
    return {"csv": (folder / "n.csv").read_bytes(), "sidecar": side}


@pytest.mark.parametrize(
    "args",
    [
        ["--rate", "0.4", "--seed", "3"],
        ["--shots", "4", "--rate", "0.5", "--seed", "2"],
        ["--type", "confusion", "--confusion-from", "predictions", "--rate", "0.5", "--device", "cpu"],
        ["--type", "confusion", "--rate", "0.5", "--device", "cpu"],
    ],
    ids=["symmetric", "shots", "confusion-from-predictions", "confusion-from-text"],
)
@pytest.mark.parametrize("as_input", [True, False], ids=["h5-input", "csv-and-features"])
def test_corrupt_reads_no_feature_values_and_writes_what_reading_them_all_wrote(
    run_cli, tiny_features, tmp_path, monkeypatch, args, as_input
):
    """corrupt reads a features file's paths and labels, not its feature values (only the labelled rows', for
    --confusion-from predictions); its outputs are those of reading the whole file."""
    from promptcli.io import features as features_io

    labels = tmp_path / "labels.csv"
    fs = read_features(tiny_features, load_views=False)
    labels.write_text(
        "path,label\n" + "".join(f"{p},{fs.classnames[y]}\n" for p, y in zip(fs.paths, fs.labels))
    )
    source = [tiny_features] if as_input else [labels, "--features", tiny_features]
    read_rows = features_io._float_rows

    def only_some(ds, keep, *rest):
        assert keep is not None, "read every feature row"
        return read_rows(ds, keep, *rest)

    outputs = {}
    for how in ("index", "whole"):
        folder = tmp_path / how
        folder.mkdir()
        with monkeypatch.context() as patch:
            if how == "whole":  # as before: every feature value read and checked
                patch.setattr(
                    features_io, "read_feature_index", lambda p: features_io.read_features(p, False)
                )
            else:
                patch.setattr(features_io, "_float_rows", only_some)
            code, _, err = run_cli("corrupt", *source, *args, "-o", folder / "n.csv")
        assert code == 0, err
        outputs[how] = _outputs(folder)
    assert outputs["index"] == outputs["whole"]
