"""promptcli report: detection by content, aggregation over seeds, grouping, outputs, errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from promptcli.analysis import reporting
from promptcli.analysis.reporting import GRADSTATS_COLUMNS, aggregate, read_results
from promptcli.errors import InputError

MODEL = {"model_name": "ViT-B-32", "pretrained": "openai", "checkpoint_sha256": "ab" * 32}


def eval_summary(
    method: str = "coop",
    loss: str = "ce",
    seed: int | None = 1,
    rate: float = 0.25,
    top1: float = 0.5,
    noise_type: str = "symmetric",
    zero_shot: bool = False,
    model: dict | None = None,
    loss_params: dict | None = None,
) -> dict:
    """An `eval --json` summary as promptcli.analysis.evaluation.evaluate writes it (the keys report reads)."""
    noise = None if zero_shot else {"type": noise_type, "rate": rate, "seed": 7, "n_noisy": 3}
    return {
        "features": "test.h5",
        "model": model or MODEL,
        "zero_shot": zero_shot,
        "ensemble": False,
        "prompts": [],
        "metrics": {
            "n": 100,
            "top1": top1,
            "top5": min(1.0, top1 + 0.2),
            "top5_k": 5,
            "macro_accuracy": top1 - 0.01,
        },
        "method": "zero-shot" if zero_shot else method,
        "loss": None if zero_shot else loss,
        "loss_params": None if zero_shot else (loss_params or {"name": loss}),
        "seed": None if zero_shot else seed,
        "shots": None if zero_shot else 16,
        "noise": noise,
        "promptcli_version": "0.1.0",
    }


def log_lines(epochs: list[tuple[float, float | None]], run: dict | None = None) -> str:
    """A tune --log file: one object per epoch (training.py's row), with a `run` object when given."""
    lines = []
    for i, (acc, clean) in enumerate(epochs, start=1):
        row = {
            "epoch": i,
            "loss": 1.0 / i,
            "lr": 0.002,
            "accuracy": acc,
            "clean_accuracy": clean,
            "time": 0.1,
        }
        if run is not None:
            row["run"] = run
        lines.append(json.dumps(row, sort_keys=True))
    return "\n".join(lines) + "\n"


def run_meta(method="coop", loss="ce", rate=0.5, seed=1) -> dict:
    return {
        "method": method,
        "loss": loss,
        "loss_params": {"name": loss},
        "seed": seed,
        "shots": 16,
        "noise": {"type": "symmetric", "rate": rate, "seed": 3},
        "model": MODEL,
    }


def write_gradstats(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=GRADSTATS_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def grad_row(epoch, step, n_noisy, noisy, n_clean, clean, method="coop", rate=0.5, seed=1) -> dict:
    ratio = noisy / clean if n_noisy and n_clean else ""
    return {
        "epoch": epoch,
        "step": step,
        "method": method,
        "loss": "ce",
        "noise_type": "symmetric",
        "noise_rate": rate,
        "seed": seed,
        "n_noisy": n_noisy,
        "n_clean": n_clean,
        "noisy_grad_norm": noisy if n_noisy else "",
        "clean_grad_norm": clean if n_clean else "",
        "ratio": ratio,
        "noisy_sum_norm": 1.0,
        "clean_sum_norm": 2.0,
    }


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def sweep(folder: Path) -> Path:
    """A small synthetic sweep: evals (3 seeds), zero-shot, tune logs and a gradstats CSV."""
    values = {
        ("coop", "ce"): {0.0: [0.80, 0.82, 0.81], 0.25: [0.70, 0.72, 0.74], 0.5: [0.50, 0.55, 0.60]},
        ("coop", "gce"): {0.0: [0.79, 0.80, 0.81], 0.25: [0.76, 0.77, 0.75], 0.5: [0.68, 0.70, 0.66]},
        ("linear-probe", "ce"): {0.0: [0.75, 0.76, 0.77], 0.25: [0.60, 0.62, 0.61], 0.5: [0.40, 0.42, 0.44]},
    }
    n = 0
    for (method, loss), by_rate in values.items():
        for rate, tops in by_rate.items():
            for seed, top1 in enumerate(tops, start=1):
                n += 1
                write_json(folder / "evals" / f"e{n:02d}.json", eval_summary(method, loss, seed, rate, top1))
    write_json(folder / "evals" / "zs.json", eval_summary(zero_shot=True, top1=0.65))
    for seed in (1, 2):
        # coop plateaus below the noisy labels and keeps its clean accuracy; linear-probe memorises the noise.
        for method, fit, peak in (("coop", 0.6, 0.75), ("linear-probe", 0.95, 0.7)):
            epochs = [
                (
                    min(fit, 0.3 + 0.06 * e) + 0.01 * seed,
                    min(peak, 0.35 + 0.08 * e)
                    - (0.03 * max(0, e - 4) if method == "linear-probe" else 0)
                    + 0.01 * seed,
                )
                for e in range(10)
            ]
            (folder / "logs").mkdir(parents=True, exist_ok=True)
            (folder / "logs" / f"{method}-{seed}.jsonl").write_text(
                log_lines(epochs, run_meta(method, seed=seed))
            )
    rows = []
    for method, base in (("coop", 1.3), ("linear-probe", 3.0)):
        for seed in (1, 2):
            for epoch in range(1, 11):
                for step in range(3):
                    noisy = base + 0.1 * seed + 0.05 * epoch
                    rows.append(grad_row(epoch, step, 8, noisy, 24, 1.0, method=method, seed=seed))
    write_gradstats(folder / "grads.csv", rows)
    return folder


def _numbers(report) -> dict:
    """The report's numbers without file paths (which legitimately differ between copies)."""
    data = report.to_dict()
    data.pop("files")
    data["warnings"] = [re.sub(r"\S+\.(json|jsonl|csv)", "FILE", w) for w in data["warnings"]]
    return data


# --- aggregation -------------------------------------------------------------------------------


def test_aggregation_gives_exact_means_and_stds(tmp_path):
    for seed, top1 in ((1, 0.5), (2, 0.6), (3, 0.7)):
        write_json(tmp_path / f"ce{seed}.json", eval_summary(seed=seed, top1=top1, rate=0.25))
    write_json(tmp_path / "ce-half.json", eval_summary(seed=1, top1=0.4, rate=0.5))
    for seed, top1 in ((1, 0.8), (2, 0.9)):
        write_json(tmp_path / f"gce{seed}.json", eval_summary(loss="gce", seed=seed, top1=top1, rate=0.25))
    write_json(tmp_path / "zs.json", eval_summary(zero_shot=True, top1=0.55))
    report = aggregate(read_results([tmp_path]))
    cells = {(c["series"], c["noise_rate"]): c for c in report.accuracy}
    assert set(cells) == {("coop + ce", 0.25), ("coop + ce", 0.5), ("coop + gce", 0.25)}
    ce = cells[("coop + ce", 0.25)]
    assert ce["mean"] == pytest.approx(0.6, abs=1e-12)
    assert ce["std"] == pytest.approx(0.1, abs=1e-12)  # sample std (ddof=1)
    assert (ce["min"], ce["max"], ce["n"], ce["seeds"]) == (0.5, 0.7, 3, [1, 2, 3])
    gce = cells[("coop + gce", 0.25)]
    assert gce["mean"] == pytest.approx(0.85, abs=1e-12)
    assert gce["std"] == pytest.approx(0.0707106781186548, abs=1e-12)
    assert cells[("coop + ce", 0.5)]["std"] is None and cells[("coop + ce", 0.5)]["n"] == 1
    assert [(z["label"], z["mean"], z["n"]) for z in report.zero_shot] == [("zero-shot CLIP", 0.55, 1)]
    header, rows = reporting.table(report)
    assert header == ["method + loss", "0.25", "0.5"]
    assert rows == [
        ["coop + ce", "60.0 ± 10.0 (3)", "40.0 (1)"],
        ["coop + gce", "85.0 ± 7.1 (2)", "—"],
        ["zero-shot CLIP", "55.0 (1)", "55.0 (1)"],
    ]
    macro = aggregate(read_results([tmp_path]), metric="macro")
    assert {(c["series"], c["noise_rate"]): c for c in macro.accuracy}[("coop + ce", 0.25)][
        "mean"
    ] == pytest.approx(0.59, abs=1e-12)


def test_noise_free_runs_join_every_noise_type_and_parameters_split_series(tmp_path):
    write_json(tmp_path / "a.json", eval_summary(rate=0.0, top1=0.8, noise_type="pair"))
    write_json(tmp_path / "b.json", eval_summary(rate=0.0, top1=0.8))  # `corrupt --rate 0`: no noise
    write_json(tmp_path / "c.json", eval_summary(rate=0.5, top1=0.6, noise_type="pair"))
    write_json(tmp_path / "d.json", eval_summary(rate=0.5, top1=0.5, noise_type="symmetric"))
    write_json(tmp_path / "e.json", eval_summary(loss="gce", loss_params={"name": "gce", "q": 0.7}, top1=0.7))
    write_json(tmp_path / "f.json", eval_summary(loss="gce", loss_params={"name": "gce", "q": 0.5}, top1=0.6))
    mixed = {
        **eval_summary(),
        "noise": None,
        "prompts": [{"noise": {"type": "pair", "rate": 0.5}}, {"noise": None}],
    }
    write_json(tmp_path / "g.json", mixed)  # an ensemble over different noise: no single rate
    results = read_results([tmp_path])
    assert any(w.startswith(f"{tmp_path / 'g.json'}: no single noise rate") for w in results.warnings)
    report = aggregate(results)
    header, rows = reporting.table(report)
    assert header == ["method + loss", "0", "pair 0.5", "symmetric 0.25", "symmetric 0.5"]
    assert rows[0] == ["coop + ce", "80.0 ± 0.0 (2)", "60.0 (1)", "—", "50.0 (1)"]
    assert [r[0] for r in rows[1:]] == ["coop + gce (q=0.5)", "coop + gce (q=0.7)"]
    assert report.noise_types() == ["pair", "symmetric"]
    # The terminal shows one table per noise type, with the noise-free column in each.
    assert reporting.table(report, "pair") == (
        ["method + loss", "0", "0.5"],
        [["coop + ce", "80.0 ± 0.0 (2)", "60.0 (1)"]],
    )


def test_pseudo_labels_cleaned_labels_and_ot_split_are_their_own_series(tmp_path):
    plain = eval_summary(rate=0.5, top1=0.6)
    cleaned = {
        **eval_summary(rate=0.5, top1=0.7),
        "noise": {"type": "symmetric", "rate": 0.5, "labels": "cleaned"},
    }
    split = {**eval_summary(rate=0.5, top1=0.65), "split": {"method": "ot", "epsilon": 0.1}}
    pseudo = {**eval_summary(loss="gce", top1=0.55), "noise": {"labels": "pseudo", "realised_rate": 0.3}}
    for name, obj in (("a", plain), ("b", cleaned), ("c", split), ("d", pseudo)):
        write_json(tmp_path / f"{name}.json", obj)
    header, rows = reporting.table(aggregate(read_results([tmp_path])))
    assert header == ["method + loss", "0", "0.5"]
    assert rows == [
        ["coop + ce", "—", "60.0 (1)"],
        ["coop + ce, OT split", "—", "65.0 (1)"],
        ["coop + ce, cleaned", "—", "70.0 (1)"],
        ["coop + gce, pseudo-labels", "55.0 (1)", "—"],
    ]


def test_a_methods_own_settings_split_its_series(tmp_path):
    """kgcoop at two lambdas is two rows (labelled with them); one setting keeps the plain label."""
    write_json(
        tmp_path / "a.json",
        {**eval_summary(top1=0.6), "method": "kgcoop", "method_params": {"kg_lambda": 8.0}},
    )
    write_json(
        tmp_path / "b.json",
        {**eval_summary(top1=0.5), "method": "kgcoop", "method_params": {"kg_lambda": 1.0}},
    )
    write_json(
        tmp_path / "c.json",
        {**eval_summary(top1=0.7), "method": "clip-adapter", "method_params": {"adapter_ratio": 0.2}},
    )
    header, rows = reporting.table(aggregate(read_results([tmp_path])))
    assert [r[0] for r in rows] == [
        "clip-adapter + ce",
        "kgcoop (kg_lambda=1) + ce",
        "kgcoop (kg_lambda=8) + ce",
    ]
    assert [r[1] for r in rows] == ["70.0 (1)", "50.0 (1)", "60.0 (1)"]


def test_grouping_ignores_file_names(tmp_path):
    first = sweep(tmp_path / "a")
    # The same files under misleading names, in other folders, in another order.
    second = tmp_path / "b"
    files = sorted(p for p in first.rglob("*") if p.is_file())
    for i, path in enumerate(reversed(files)):
        target = second / f"sub{i % 3}" / f"gce_linear-probe_seed9_rate0.75_{i}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    a, b = aggregate(read_results([first])), aggregate(read_results([second]))
    assert _numbers(a) == _numbers(b)
    assert len(a.accuracy) == 9 and {c["n"] for c in a.accuracy} == {3}
    assert reporting.table(a) == reporting.table(b)


def test_each_kind_is_detected_by_content_not_name(tmp_path):
    write_json(tmp_path / "grads.csv", eval_summary())  # an eval summary named like a CSV
    (tmp_path / "metrics.json").write_text(log_lines([(0.5, 0.4)], run_meta()))  # a log named like JSON
    write_gradstats(tmp_path / "train.jsonl", [grad_row(1, 0, 2, 2.0, 6, 1.0)])
    # Not results: a labels CSV, a corrupt sidecar, a tune --json summary, a predictions CSV.
    (tmp_path / "noisy.csv").write_text("path,label,clean_label,is_noisy\na.png,cat,dog,1\n")
    write_json(tmp_path / "noisy.csv.json", {"type": "symmetric", "rate": 0.5, "seed": 0})
    write_json(tmp_path / "tune.json", {"metrics": {"train_accuracy": 0.9}, "method": "coop"})
    (tmp_path / "preds.csv").write_text("path,label,confidence,true_label\na.png,cat,0.9,cat\n")
    results = read_results([tmp_path])
    kinds = {Path(f.path).name: f.kind for f in results.files}
    assert kinds == {"grads.csv": "eval", "metrics.json": "tune-log", "train.jsonl": "gradstats"}
    assert sorted(Path(p).name for p in results.skipped) == [
        "noisy.csv",
        "noisy.csv.json",
        "preds.csv",
        "tune.json",
    ]
    assert (len(results.evals), len(results.logs), len(results.grads)) == (1, 1, 1)
    # A file named explicitly must be a result.
    with pytest.raises(InputError, match="not a promptcli result"):
        read_results([tmp_path / "noisy.csv"])


def test_identical_copies_are_read_once(tmp_path):
    write_json(tmp_path / "x.json", eval_summary(top1=0.5))
    shutil.copy(tmp_path / "x.json", tmp_path / "copy.json")
    results = read_results([tmp_path])
    assert len(results.evals) == 1
    assert any("same content" in w for w in results.warnings)


COOP_SETTINGS = {
    "n_ctx": 16,
    "class_position": "end",
    "csc": False,
    "ctx_init": "",
    "template": "a photo of a {}.",
}
SCHEDULE = {
    "optimizer": "sgd",
    "lr": 0.002,
    "epochs": 50,
    "batch_size": 32,
    "weight_decay": 0.0005,
    "schedule": "constant warm-up then cosine (per epoch)",
}


def on_test(
    summary: dict, test: str = "test.h5", sha: str = "4c" * 32, prompt: str | None = None, **settings
) -> dict:
    """``summary`` evaluated on the features file ``test`` (SHA-256 ``sha``), of a prompt with ``settings``
    (prompt settings, and ``optimizer`` the schedule) and SHA-256 ``prompt``."""
    out = {**summary, "features": f"/data/{test}", "features_sha256": sha}
    if not summary["zero_shot"]:
        member = {**settings, "seed": summary["seed"], "method": summary["method"], "noise": summary["noise"]}
        digest = hashlib.sha256(json.dumps(member, sort_keys=True).encode()).hexdigest()
        out["prompts"] = [{**member, "sha256": prompt or digest}]
    return out


def test_runs_on_different_test_sets_are_never_pooled_and_repeats_count_once(tmp_path, run_cli):
    """Two datasets' test features (even both named test.h5) are two series; zero-shot per test set and
    templates; the same prompt evaluated twice on the same features is one run, with a warning."""
    demo, hold = "4c" * 32, "28" * 32
    for seed, top1 in ((1, 0.5), (2, 0.6)):
        write_json(tmp_path / "demo" / f"s{seed}.json", on_test(eval_summary(seed=seed, top1=top1), sha=demo))
        write_json(
            tmp_path / "hold" / f"s{seed}.json", on_test(eval_summary(seed=seed, top1=top1 + 0.3), sha=hold)
        )
    # the same prompt evaluated again on the same features: the file differs only by `created`
    again = {**on_test(eval_summary(seed=1, top1=0.5), sha=demo), "created": "later"}
    write_json(tmp_path / "demo" / "s1-again.json", again)
    zs = eval_summary(zero_shot=True, top1=0.4)
    write_json(tmp_path / "zs" / "demo.json", {**on_test(zs, sha=demo), "templates": ["a photo of a {}."]})
    write_json(tmp_path / "zs" / "hold.json", {**on_test(zs, sha=hold), "templates": ["a photo of a {}."]})
    imagenet = {
        **on_test(zs, sha=demo),
        "templates": ["a photo of a {}.", "a bad photo of a {}."],
        "metrics": {**zs["metrics"], "top1": 0.45},
    }
    write_json(tmp_path / "zs" / "demo-imagenet.json", imagenet)

    report = aggregate(read_results([tmp_path]))
    cells = {c["series"]: c for c in report.accuracy}
    assert sorted(cells) == ["coop + ce, on test.h5 (28282828)", "coop + ce, on test.h5 (4c4c4c4c)"]
    demo_cell = cells["coop + ce, on test.h5 (4c4c4c4c)"]
    assert (demo_cell["n"], demo_cell["seeds"], demo_cell["mean"]) == (2, [1, 2], pytest.approx(0.55))
    assert cells["coop + ce, on test.h5 (28282828)"]["mean"] == pytest.approx(0.85)
    repeat = (
        f"{tmp_path / 'demo' / 's1.json'} repeats the evaluation in {tmp_path / 'demo' / 's1-again.json'}"
    )
    assert any(w.startswith(repeat) for w in report.warnings)
    assert any(w.startswith("results are on 2 test sets") for w in report.warnings)
    digest = hashlib.sha256(json.dumps(imagenet["templates"]).encode()).hexdigest()[:8]
    assert sorted((z["label"], z["mean"], z["n"]) for z in report.zero_shot) == [
        (f"zero-shot CLIP (templates=2 ({digest})), on test.h5 (4c4c4c4c)", 0.45, 1),
        ("zero-shot CLIP (templates=a photo of a {}.), on test.h5 (28282828)", 0.4, 1),
        ("zero-shot CLIP (templates=a photo of a {}.), on test.h5 (4c4c4c4c)", 0.4, 1),
    ]
    code, stdout, stderr = run_cli("report", tmp_path)
    assert code == 0 and "repeats the evaluation" in " ".join(stderr.split()) and "28282828" in stdout, stderr


def test_labels_without_a_noise_sidecar_are_noise_unknown_never_no_noise(tmp_path):
    write_json(tmp_path / "none.json", eval_summary(rate=0.0, top1=0.8))  # `corrupt --rate 0`
    write_json(tmp_path / "unknown1.json", {**eval_summary(seed=1, top1=0.4), "noise": None})
    write_json(tmp_path / "unknown2.json", {**eval_summary(seed=2, top1=0.5), "noise": None})
    (tmp_path / "log.jsonl").write_text(log_lines([(0.4, None)], {**run_meta(), "noise": None}))
    write_gradstats(
        tmp_path / "g.csv", [{**grad_row(1, 0, 2, 2.0, 6, 1.0), "noise_type": "", "noise_rate": ""}]
    )
    report = aggregate(read_results([tmp_path]))
    header, rows = reporting.table(report)
    assert header == ["method + loss", "0", "noise unknown"]
    assert rows == [["coop + ce", "80.0 (1)", "45.0 ± 7.1 (2)"]]
    assert {(c["noise_type"], c["noise_rate"]) for c in report.accuracy} == {
        ("none", 0.0),
        ("noise unknown", None),
    }
    assert any("2 eval result(s)" in w and "without a noise rate on record" in w for w in report.warnings)
    assert "training labels without a noise rate on record" in reporting.caption(report)
    assert [(c["noise_type"], c["noise_rate"]) for c in report.curves] == [("noise unknown", None)]
    assert [(g["noise_type"], g["noise_rate"]) for g in report.gradients] == [("noise unknown", None)]
    assert report.noise_types() == []
    assert reporting.figure_png(report).startswith(PNG_MAGIC)  # the unknown column is left out of the figure


def test_runs_all_of_unknown_noise_make_a_table_and_no_empty_figure(tmp_path, run_cli):
    write_json(tmp_path / "real.json", {**eval_summary(seed=1, top1=0.4), "noise": {"format": "image list"}})
    write_json(tmp_path / "unknown.json", {**eval_summary(seed=2, top1=0.5), "noise": None})
    html = tmp_path / "r.html"
    code, _, err = run_cli("report", tmp_path / "real.json", tmp_path / "unknown.json", "-o", html)
    assert code == 0, err
    assert "<td>45.0 ± 7.1 (2)</td>" in html.read_text()  # a sidecar without a rate is unknown noise too
    code, _, err = run_cli("report", tmp_path / "real.json", "-o", tmp_path / "r.png")
    assert code == 2 and "nothing to draw: every run's noise rate is unknown" in " ".join(err.split())


def test_prompt_and_schedule_settings_split_series_and_name_what_differs(tmp_path):
    """--n-ctx 4 --csc --class-position front is not CoOp's default; a 1-epoch probe is not a 20-epoch one."""
    small = {**COOP_SETTINGS, "n_ctx": 4, "csc": True, "class_position": "front"}
    for seed in (1, 2):
        write_json(
            tmp_path / f"c{seed}.json",
            on_test(eval_summary(seed=seed, top1=0.6), **COOP_SETTINGS, optimizer=SCHEDULE),
        )
        write_json(
            tmp_path / f"s{seed}.json",
            on_test(eval_summary(seed=seed, top1=0.3), **small, optimizer=SCHEDULE),
        )
    coop_schedule = {
        **SCHEDULE,
        "schedule": "constant warm-up then cosine from the full rate (per epoch; CoOp's code)",
    }
    write_json(
        tmp_path / "sched.json",
        on_test(eval_summary(seed=1, top1=0.62), **COOP_SETTINGS, optimizer=coop_schedule),
    )
    lp = {**SCHEDULE, "lr": 1.0, "epochs": 20, "weight_decay": 0.01}
    write_json(tmp_path / "lp20.json", on_test(eval_summary("linear-probe", top1=0.7), optimizer=lp))
    short = {**lp, "lr": 0.01, "epochs": 1}
    write_json(tmp_path / "lp1.json", on_test(eval_summary("linear-probe", top1=0.3), optimizer=short))
    report = aggregate(read_results([tmp_path]))
    cells = {c["series"]: (c["mean"], c["n"]) for c in report.accuracy}
    assert cells == {
        "coop (n_ctx=16, class_position=end, csc=False, schedule=cosine) + ce": (pytest.approx(0.6), 2),
        "coop (n_ctx=16, class_position=end, csc=False, schedule=coop) + ce": (0.62, 1),
        "coop (n_ctx=4, class_position=front, csc=True, schedule=cosine) + ce": (pytest.approx(0.3), 2),
        "linear-probe (lr=0.01, epochs=1) + ce": (0.3, 1),
        "linear-probe (lr=1, epochs=20) + ce": (0.7, 1),
    }
    assert not [w for w in report.warnings if "pools" in w or "differ" in w]


def test_settings_that_cannot_be_told_apart_pool_with_a_warning(tmp_path):
    # the linear probe's weight decay is searched per run (unless --weight-decay): pooled, named
    for seed, wd in ((1, 0.01), (2, 0.0)):
        summary = eval_summary("linear-probe", seed=seed, top1=0.5 + seed / 10)
        write_json(tmp_path / f"lp{seed}.json", on_test(summary, optimizer={**SCHEDULE, "weight_decay": wd}))
    # an eval summary from before prompts recorded their settings
    write_json(tmp_path / "old.json", on_test(eval_summary(seed=3, top1=0.6)))
    write_json(
        tmp_path / "new.json", on_test(eval_summary(seed=4, top1=0.6), **COOP_SETTINGS, optimizer=SCHEDULE)
    )
    report = aggregate(read_results([tmp_path]))
    assert {c["series"]: c["n"] for c in report.accuracy} == {"coop + ce": 2, "linear-probe + ce": 2}
    assert (
        "linear-probe + ce: runs pooled at noise rate 0.25 differ in weight_decay (0, 0.01): "
        "the probe's search picks it per run unless --weight-decay is given"
    ) in report.warnings
    [pooled] = [w for w in report.warnings if w.startswith("coop + ce: pools runs that differ in")]
    assert "n_ctx" in pooled and "epochs" in pooled and "test" not in pooled


def test_split_and_cleaning_recipes_are_series_and_a_repeated_seed_is_named(tmp_path):
    from promptcli.io.sidecar import noise_summary

    ot = {"method": "ot", "noisy_loss": "mae", "epsilon": 0.1}
    plain = on_test(eval_summary(top1=0.52), prompt="01" * 32)
    write_json(tmp_path / "plain.json", {**plain, "split": {"method": "none"}})
    write_json(
        tmp_path / "ot.json", {**on_test(eval_summary(top1=0.10, loss="gce"), prompt="02" * 32), "split": ot}
    )
    # an eval summary from before summaries recorded the split: its prompt's record says it
    write_json(tmp_path / "ot_old.json", on_test(eval_summary(seed=2, top1=0.12, loss="gce"), split=ot))
    recipes = []
    for name, score, relabel in (("post", "posterior", True), ("margin", "margin", False)):
        sidecar = {"type": "symmetric", "rate": 0.25, "seed": 7}
        sidecar["cleaning"] = {"score": score, "zero_shot": {"templates": ["a {}."]} if relabel else None,
                               "options": {"relabel": relabel, "threshold": 0.5, "keep_fraction": None,
                                           "noise_model": "symmetric" if relabel else None}}  # fmt: skip
        noise = noise_summary(sidecar)
        recipes.append(noise["cleaning"])
        summary = {**eval_summary(method="linear-probe", top1=0.4 if relabel else 0.6), "noise": noise}
        write_json(tmp_path / f"{name}.json", on_test(summary))
    assert recipes == ["posterior, zero-shot, relabel, threshold 0.5", "margin, prompt, drop, threshold 0.5"]
    report = aggregate(read_results([tmp_path]))
    assert {c["series"]: c["n"] for c in report.accuracy} == {
        "coop + ce": 1,
        "coop + gce, OT split": 2,
        "linear-probe + ce, cleaned (margin, prompt, drop, threshold 0.5)": 1,
        "linear-probe + ce, cleaned (posterior, zero-shot, relabel, threshold 0.5)": 1,
    }
    assert not [w for w in report.warnings if "runs of seed" in w], report.warnings
    # two prompts of one seed and noise draw that nothing on record tells apart: pooled, and said so
    write_json(tmp_path / "again.json", on_test(eval_summary(top1=0.7), prompt="ab" * 32))
    report = aggregate(read_results([tmp_path]))
    [warning] = [w for w in report.warnings if "runs of seed" in w]
    assert warning.startswith("coop + ce: 2 runs of seed 1 pooled at noise rate 0.25 (")


def test_a_run_whose_realised_noise_is_off_its_column_is_named(tmp_path):
    summary = eval_summary(rate=0.125)
    summary["noise"] = {**summary["noise"], "realised_rate": 0.25}
    write_json(tmp_path / "few.json", on_test(summary))
    write_json(tmp_path / "ok.json", on_test(eval_summary(seed=2, rate=0.125), prompt="03" * 32))
    report = aggregate(read_results([tmp_path]))
    [warning] = [w for w in report.warnings if "realised" in w]
    assert (
        "few.json: its labels' realised noise rate is 25.0%, filed under the rate asked for, 0.125" in warning
    )


def test_a_searched_weight_decay_pools_quietly_and_a_fixed_one_is_its_own_series(tmp_path):
    for seed, wd in ((1, 0.01), (2, 0.0)):  # the search picked another decay on each seed
        summary = eval_summary("linear-probe", seed=seed, top1=0.5 + seed / 10)
        optimizer = {**SCHEDULE, "weight_decay": wd}
        write_json(
            tmp_path / f"lp{seed}.json", on_test(summary, optimizer=optimizer, weight_decay_searched=True)
        )
    fixed = eval_summary("linear-probe", seed=1, top1=0.4)
    optimizer = {**SCHEDULE, "weight_decay": 0.001}
    write_json(tmp_path / "fixed.json", on_test(fixed, optimizer=optimizer, weight_decay_searched=False))
    report = aggregate(read_results([tmp_path]))
    assert {c["series"]: c["n"] for c in report.accuracy} == {
        "linear-probe (weight_decay=searched) + ce": 2,
        "linear-probe (weight_decay=0.001) + ce": 1,
    }
    assert not [w for w in report.warnings if "weight_decay" in w], report.warnings


def gradstats_sidecar(path: Path, model: dict, epochs: int = 1) -> None:
    """The sidecar `gradstats` writes next to its CSV (the keys report reads)."""
    optimizer = {**SCHEDULE, "lr": 1.0, "epochs": epochs}
    write_json(
        Path(f"{path}.json"),
        {
            "model": model,
            "noise": {"type": "symmetric", "rate": 0.5, "seed": 1},
            "options": {**COOP_SETTINGS, "split": "none"},
            "runs": [{"method": "coop", "loss": "ce", "optimizer": optimizer}],
        },
    )


def test_gradstats_of_different_models_are_different_series(tmp_path, run_cli):
    other = {"model_name": "RN50", "pretrained": "openai", "checkpoint_sha256": ""}
    for name, model, seed in (("a", MODEL, 1), ("b", other, 5), ("c", MODEL, 2)):
        write_gradstats(tmp_path / f"{name}.csv", [grad_row(1, 0, 2, 2.0 * seed, 6, 1.0, seed=seed)])
        gradstats_sidecar(tmp_path / f"{name}.csv", model)
    write_gradstats(tmp_path / "d.csv", [grad_row(1, 0, 2, 9.0, 6, 1.0, seed=3)])
    gradstats_sidecar(tmp_path / "d.csv", MODEL, epochs=5)  # another schedule
    report = aggregate(read_results([tmp_path]))
    grads = {g["series"]: g["n_runs"] for g in report.gradients}
    assert grads == {
        "coop (epochs=1) + ce [ViT-B-32/openai (abababab)]": 2,
        "coop (epochs=1) + ce [RN50/openai]": 1,
        "coop (epochs=5) + ce [ViT-B-32/openai (abababab)]": 1,
    }
    assert any(w.startswith("results come from 2 models") for w in report.warnings)
    Path(f"{tmp_path / 'd.csv'}.json").unlink()
    code, _, stderr = run_cli("report", tmp_path / "d.csv")
    assert code == 0 and f"{tmp_path / 'd.csv'}: no sidecar d.csv.json" in " ".join(stderr.split()), stderr
    Path(
        f"{tmp_path / 'd.csv'}.json"
    ).mkdir()  # a folder (or FIFO) where the sidecar belongs is no missing one
    code, _, stderr = run_cli("report", tmp_path / "d.csv")
    said = " ".join(stderr.split())
    assert code == 0 and "d.csv.json: sidecar is a folder, not a regular file; ignored" in said, stderr
    Path(f"{tmp_path / 'd.csv'}.json").rmdir()
    os.mkfifo(f"{tmp_path / 'd.csv'}.json")
    code, _, stderr = run_cli("report", tmp_path / "d.csv")
    assert code == 0 and "d.csv.json: sidecar is a FIFO, not a regular file; ignored" in " ".join(
        stderr.split()
    )


# --- tune logs and gradstats ---------------------------------------------------------------------


def test_tune_logs_are_grouped_by_their_provenance_and_averaged_per_epoch(tmp_path):
    (tmp_path / "1.jsonl").write_text(log_lines([(0.4, 0.3), (0.6, 0.5)], run_meta(seed=1)))
    (tmp_path / "2.jsonl").write_text(log_lines([(0.5, 0.4), (0.8, 0.6)], run_meta(seed=2)))
    (tmp_path / "3.jsonl").write_text(log_lines([(0.9, 0.8)], run_meta(rate=0.25)))  # another noise rate
    header = json.dumps({"run": run_meta(method="linear-probe")})  # provenance on a header line only
    (tmp_path / "4.jsonl").write_text(header + "\n" + log_lines([(0.3, None), (0.35, None)]))
    report = aggregate(read_results([tmp_path]))
    curves = {c["series"]: c for c in report.curves}
    assert set(curves) == {"coop + ce", "linear-probe + ce"}  # drawn at the highest rate, 0.5
    coop = curves["coop + ce"]
    assert (coop["noise_type"], coop["noise_rate"], coop["n_runs"], coop["epochs"]) == (
        "symmetric",
        0.5,
        2,
        [1, 2],
    )
    assert [s["mean"] for s in coop["accuracy"]] == pytest.approx([0.45, 0.7], abs=1e-12)
    assert [s["mean"] for s in coop["clean_accuracy"]] == pytest.approx([0.35, 0.55], abs=1e-12)
    assert coop["accuracy"][1]["std"] == pytest.approx(0.1414213562373095, abs=1e-12)
    assert curves["linear-probe + ce"]["clean_epochs"] == []
    low = aggregate(read_results([tmp_path]), curve_rate=0.25)
    assert [(c["series"], c["accuracy"][0]["mean"]) for c in low.curves] == [("coop + ce", 0.9)]
    none = aggregate(read_results([tmp_path]), curve_rate=0.75)
    assert (
        none.curves == [] and "no tune log at noise rate 0.75: no labelled training curves" in none.warnings
    )


def test_a_log_short_of_its_planned_epochs_is_warned_about(tmp_path):
    """A run still going (or stopped) in the folder: its curve is drawn, and said to end early."""
    meta = {**run_meta(), "settings": {"optimizer": {"epochs": 12}}}
    (tmp_path / "going.jsonl").write_text(log_lines([(0.4, 0.3)] * 4, meta))
    (tmp_path / "done.jsonl").write_text(log_lines([(0.4, 0.3)] * 12, {**meta, "seed": 2}))
    warnings = read_results([tmp_path]).warnings
    assert [w for w in warnings if "epochs" in w] == [
        f"{tmp_path / 'going.jsonl'}: holds 4 of its 12 epochs (a run still going, or stopped): its curve ends early"
    ]


def test_tune_logs_without_provenance_are_separate_unlabelled_runs(tmp_path):
    (tmp_path / "z.jsonl").write_text(log_lines([(0.4, 0.3)]))
    (tmp_path / "a.jsonl").write_text(log_lines([(0.7, 0.6)]))
    report = aggregate(read_results([tmp_path]))
    assert sorted(c["series"] for c in report.curves) == ["unlabelled run 1", "unlabelled run 2"]
    assert any("carry no provenance" in w for w in report.warnings)
    # Numbering follows content, not names: renaming keeps each log's number.
    numbering = {c["accuracy"][0]["mean"]: c["series"] for c in report.curves}
    (tmp_path / "z.jsonl").rename(tmp_path / "0.jsonl")
    again = aggregate(read_results([tmp_path]))
    assert {c["accuracy"][0]["mean"]: c["series"] for c in again.curves} == numbering


def test_gradient_ratio_is_the_ratio_of_count_weighted_mean_norms(tmp_path):
    rows = [
        grad_row(1, 0, 2, 4.0, 6, 1.0),
        grad_row(1, 1, 0, 0.0, 8, 2.0),  # no noisy sample in this batch
        grad_row(2, 2, 4, 3.0, 4, 1.5),
        grad_row(1, 0, 2, 6.0, 6, 1.0, seed=2),
        grad_row(2, 1, 4, 3.0, 4, 1.0, seed=2),
        grad_row(1, 0, 5, 9.0, 5, 1.0, method="linear-probe"),
        grad_row(1, 0, 5, 9.0, 5, 1.0, rate=0.25),  # another noise rate: not in the panel
    ]
    write_gradstats(tmp_path / "g.csv", rows)
    report = aggregate(read_results([tmp_path]))
    grads = {g["series"]: g for g in report.gradients}
    assert set(grads) == {"coop + ce", "linear-probe + ce"}
    coop = grads["coop + ce"]
    seed1 = [4.0 / ((6 * 1.0 + 8 * 2.0) / 14), 2.0]
    seed2 = [6.0, 3.0]
    assert (coop["epochs"], coop["n_runs"]) == ([1, 2], 2)
    assert [s["mean"] for s in coop["ratio"]] == pytest.approx(
        [(seed1[0] + seed2[0]) / 2, (seed1[1] + seed2[1]) / 2], abs=1e-12
    )
    assert grads["linear-probe + ce"]["ratio"][0]["mean"] == pytest.approx(9.0)


# --- real files from promptcli itself --------------------------------------------------------------


def true_labels_at_rate(features: Path, folder: Path) -> Path:
    """The features' true labels as a CSV whose sidecar says symmetric noise at rate 0.25."""
    from promptcli.io.features import read_features

    fs = read_features(features)
    labels = folder / "noisy.csv"
    labels.write_text(
        "path,label\n" + "".join(f"{p},{fs.classnames[y]}\n" for p, y in zip(fs.paths, fs.labels))
    )
    write_json(folder / "noisy.csv.json", {"type": "symmetric", "rate": 0.25, "seed": 3})
    return labels


def test_reads_a_real_eval_summary_and_tune_log(tmp_path, tiny_features):
    from promptcli.analysis.evaluation import evaluate
    from promptcli.learning.options import TuneOptions
    from promptcli.learning.tune_run import tune

    labels = true_labels_at_rate(tiny_features, tmp_path)
    prompt, log = tmp_path / "lp.safetensors", tmp_path / "out" / "lp.jsonl"
    log.parent.mkdir()
    options = TuneOptions(method="linear-probe", epochs=2, weight_decay=1e-4, seed=4)
    tune(tiny_features, labels, prompt, options, device="cpu", log_path=log)
    summary = evaluate(tiny_features, [prompt], device="cpu").summary
    write_json(tmp_path / "out" / "metrics.json", json.loads(json.dumps(summary, default=str)))
    zs = evaluate(tiny_features, zero_shot=True, device="cpu").summary
    write_json(tmp_path / "out" / "zs.json", json.loads(json.dumps(zs, default=str)))

    report = aggregate(read_results([tmp_path / "out"]))
    assert sorted(f.kind for f in report.files) == ["eval", "eval", "tune-log"]
    [cell] = report.accuracy
    # tuned and scored on one features file: recorded as such, and a series of its own
    assert summary["tuned_on_test"] and summary["prompts"][0]["tuned_on_test"]
    assert (cell["series"], cell["noise_type"], cell["noise_rate"], cell["seeds"]) == (
        "linear-probe + ce, tuned on the test features",
        "symmetric",
        0.25,
        [4],
    )
    assert cell["mean"] == pytest.approx(summary["metrics"]["top1"])
    assert report.zero_shot[0]["mean"] == pytest.approx(zs["metrics"]["top1"])
    assert [c["epochs"] for c in report.curves] == [[1, 2]]


def test_tune_logs_record_the_prompt_and_schedule_settings_and_split_curves_by_them(tmp_path, tiny_features):
    from promptcli.learning.options import TuneOptions
    from promptcli.learning.tune_run import tune

    labels = true_labels_at_rate(tiny_features, tmp_path)
    (tmp_path / "out").mkdir()
    for name, lr in (("a", 0.1), ("b", 1.0)):
        options = TuneOptions(method="linear-probe", epochs=2, weight_decay=1e-4, lr=lr, seed=4)
        tune(
            tiny_features,
            labels,
            tmp_path / f"{name}.safetensors",
            options,
            device="cpu",
            log_path=tmp_path / "out" / f"{name}.jsonl",
        )
    first = json.loads((tmp_path / "out" / "a.jsonl").read_text().splitlines()[0])
    settings = first["run"]["settings"]
    assert settings["optimizer"]["lr"] == 0.1 and settings["weight_decay_searched"] is False
    assert (settings["use_views"], settings["n_views"]) == (True, 2)  # as the prompt file records them
    report = aggregate(read_results([tmp_path / "out"]))
    assert sorted(c["series"] for c in report.curves) == [
        "linear-probe (lr=0.1) + ce",
        "linear-probe (lr=1) + ce",
    ]


# --- the command -----------------------------------------------------------------------------------


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writes_png_html_and_markdown_and_refuses_overwrite(tmp_path, run_cli):
    from PIL import Image

    data = sweep(tmp_path / "results")
    html_out, png_out, md_out = tmp_path / "r.html", tmp_path / "r.png", tmp_path / "r.md"
    code, stdout, stderr = run_cli(
        "report", data, "-o", html_out, "-o", png_out, "-o", md_out, "--title", "Sweep"
    )
    assert code == 0, stderr
    png = png_out.read_bytes()
    assert png.startswith(PNG_MAGIC)
    with Image.open(png_out) as image:
        image.verify()
    with Image.open(png_out) as image:
        assert image.size[0] > 1500 and image.size[1] > 500  # 3 panels side by side
        assert image.info["Software"] == "promptcli 0.1.0"  # the figure records how it was made
        assert (
            image.info["Description"].startswith("promptcli report ")
            and "--title Sweep" in image.info["Description"]
        )
    page = html_out.read_text()
    assert page.count("<table>") == 2  # results and provenance
    assert "<td>coop + gce</td><td>80.0 ± 1.0 (3)</td><td>76.0 ± 1.0 (3)</td><td>68.0 ± 2.0 (3)</td>" in page
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == png  # self-contained: the same figure inlined
    assert "promptcli: <code>0.1.0</code>" in page and "created: <code>" in page
    assert str(data / "grads.csv") in page
    md = md_out.read_text()
    assert "| coop + ce | 81.0 ± 1.0 (3) | 72.0 ± 2.0 (3) | 55.0 ± 5.0 (3) |" in md
    assert "![Sweep](r.png)" in md
    code, _, stderr = run_cli("report", data, "-o", tmp_path / "my fig (1).png", "-o", tmp_path / "b.md")
    assert code == 0, stderr
    assert "](<my fig (1).png>)" in (tmp_path / "b.md").read_text()  # still one Markdown link
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left

    before = html_out.stat().st_mtime_ns, html_out.read_bytes()
    code, _, stderr = run_cli("report", data, "-o", html_out)
    assert code == 2
    assert (
        stderr.strip()
        == f"Error: {html_out}: output exists — pass --force to overwrite it or choose another -o"
    )
    assert (html_out.stat().st_mtime_ns, html_out.read_bytes()) == before
    code, _, stderr = run_cli("report", data, "-o", html_out, "--force", "--title", "Again")
    assert code == 0, stderr
    assert "<h1>Again</h1>" in html_out.read_text()


def test_a_failed_render_leaves_no_file(tmp_path, monkeypatch):
    data = sweep(tmp_path / "results")
    report = aggregate(read_results([data]))
    target = tmp_path / "out" / "r.html"
    target.parent.mkdir()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reporting, "render_html", broken)
    with pytest.raises(RuntimeError):
        reporting.write_report(report, [target], {})
    assert list(target.parent.iterdir()) == []


def test_terminal_table_and_json(tmp_path, run_cli):
    data = sweep(tmp_path / "results")
    code, stdout, stderr = run_cli("report", data)
    assert code == 0, stderr
    assert "coop + gce" in stdout and "76.0 ± 1.0 (3)" in stdout and "zero-shot CLIP" in stdout
    assert "read 28 eval summaries, 4 tune logs, 1 gradstats CSVs" in stderr
    code, stdout, stderr = run_cli("report", data, "--json", "--metric", "top5")
    assert code == 0, stderr
    numbers = json.loads(stdout)
    assert numbers["metric"] == "top5"
    cell = next(c for c in numbers["accuracy"] if c["series"] == "coop + ce" and c["noise_rate"] == 0.5)
    assert cell["mean"] == pytest.approx(0.75) and cell["n"] == 3
    assert len(numbers["files"]) == 33 and numbers["outputs"] == []
    assert {g["series"] for g in numbers["gradient_ratio"]} == {"coop + ce", "linear-probe + ce"}


def test_mixed_models_are_named_in_labels_with_a_warning(tmp_path, run_cli):
    other = {"model_name": "RN50", "pretrained": "openai", "checkpoint_sha256": ""}
    write_json(tmp_path / "a.json", eval_summary(top1=0.5))
    write_json(tmp_path / "b.json", eval_summary(top1=0.6, model=other))
    code, stdout, stderr = run_cli("report", tmp_path)
    assert code == 0, stderr
    assert "results come from 2 models" in stderr
    report = aggregate(read_results([tmp_path]))
    assert sorted(c["series"] for c in report.accuracy) == [
        "coop + ce [RN50/openai]",
        "coop + ce [ViT-B-32/openai (abababab)]",
    ]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: None, ["{d}"], "Error: {d}: no results found — give `eval --json` summaries"),
        (
            lambda d: (d / "labels.csv").write_text("path,label\na,b\n"),
            ["{d}"],
            "Error: {d}: no results found (1 other file(s) skipped)",
        ),
        (
            lambda d: (d / "m.json").write_text(json.dumps(eval_summary())[:-20]),
            ["{d}"],
            "Error: {d}/m.json: not valid JSON (",
        ),
        (
            lambda d: (d / "l.jsonl").write_text(log_lines([(0.1, 0.1), (0.2, 0.2)]) + '{"epoch": 3, "acc\n'),
            ["{d}"],
            "Error: {d}/l.jsonl:3: not valid JSON",
        ),
        (
            lambda d: (d / "g.csv").write_text("epoch,step,noisy_grad_norm,clean_grad_norm\n1,0,1,1\n"),
            ["{d}"],
            "Error: {d}/g.csv: gradstats CSV lacks column(s) method, loss, noise_type",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [{**grad_row(1, 0, 2, 1.0, 2, 1.0), "n_noisy": "two"}]),
            ["{d}"],
            "Error: {d}/g.csv:2: column n_noisy is not a number ('two')",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "metrics": {"top1": None}}),
            ["{d}"],
            "Error: {d}/m.json: metrics.top1 is not a number (None)",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "prompts": [{"n_views": "two"}]}),
            ["{d}"],
            "Error: {d}/m.json: n_views is 'two', not an integer",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "prompts": [{"init_std": "x"}]}),
            ["{d}"],
            "Error: {d}/m.json: init_std is 'x', not a finite number",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "prompts": [{"init_std": 10**400}]}),
            ["{d}"],
            "Error: {d}/m.json: init_std is 1" + "0" * 36 + "..., not a finite number",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "prompts": 1}),
            ["{d}"],
            "Error: {d}/m.json: prompts is 1, not a list",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "labels_sha256": ["a"]}),
            ["{d}"],
            "Error: {d}/m.json: labels_sha256 is ['a'], not a string",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [{**grad_row(1, 0, 2, 1.0, 2, 1.0), "n_noisy": "1e400"}]),
            ["{d}"],
            "Error: {d}/g.csv:2: column n_noisy is not a number ('1e400')",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(top1=0.5), "metrics": {"top1": 1.5}}),
            ["{d}"],
            "Error: {d}/m.json: metrics.top1 is 1.5, not a fraction in [0, 1]",
        ),
        (
            lambda d: write_json(
                d / "m.json", {**eval_summary(), "metrics": {**eval_summary()["metrics"], "top5": 10**400}}
            ),
            ["{d}"],
            "Error: {d}/m.json: metrics.top5 is not a number (1" + "0" * 36 + "...)",
        ),
        (
            lambda d: (d / "m.json").write_text(json.dumps({**eval_summary(), "seed": float("nan")})),
            ["{d}"],
            "Error: {d}/m.json: holds NaN, which promptcli never writes",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary(rate=1.5)),
            ["{d}"],
            "Error: {d}/m.json: noise rate 1.5 is not a fraction in [0, 1]",
        ),
        (
            lambda d: (d / "t.jsonl").write_text(log_lines([(0.5, None), (2.0, None)], run_meta())),
            ["{d}"],
            "Error: {d}/t.jsonl: epoch line 2: accuracy is 2.0, not a fraction in [0, 1]",
        ),
        (
            lambda d: (d / "g.csv").write_text(
                ",".join(GRADSTATS_COLUMNS)
                + "\n\n"
                + ",".join(str(v) for v in grad_row(1, 0, 2, 1.0, 2, 1.0).values())[:-4]
                + "\n"
            ),
            ["{d}"],
            "Error: {d}/g.csv:3: row has 13 fields, the header 14",
        ),
        (
            lambda d: (d / "g.csv").write_text(
                ",".join(GRADSTATS_COLUMNS)
                + ",ratio\n"
                + ",".join(str(v) for v in grad_row(1, 0, 2, 1.0, 2, 1.0).values())
                + ",9\n"
            ),
            ["{d}"],
            "Error: {d}/g.csv: column 'ratio' appears twice in the header",
        ),
        (
            lambda d: write_gradstats(
                d / "g.csv", [{**grad_row(1, 0, 2, 1.0, 2, 1.0), "method": "c" * 200_000}]
            ),
            ["{d}"],
            "Error: {d}/g.csv: malformed CSV (line 2: field larger than field limit (131072))",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary(seed=-1)),
            ["{d}"],
            "Error: {d}/m.json: seed is -1, not an integer in 0..4294967295",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary(seed=1.5)),
            ["{d}"],
            "Error: {d}/m.json: seed is 1.5, not an integer",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary(seed=1e308)),
            ["{d}"],
            "Error: {d}/m.json: seed is 1e+308, not an integer",
        ),
        (
            lambda d: write_json(d / "m.json", {**eval_summary(), "shots": -3}),
            ["{d}"],
            "Error: {d}/m.json: shots is -3, not an integer >= 1",
        ),
        (
            lambda d: write_json(
                d / "m.json", {**eval_summary(), "noise": {**eval_summary()["noise"], "seed": -1}}
            ),
            ["{d}"],
            "Error: {d}/m.json: noise.seed is -1, not an integer in 0..4294967295",
        ),
        (
            lambda d: (d / "t.jsonl").write_text(
                log_lines([(0.5, None)], run_meta()).replace('"epoch": 1', '"epoch": 1.5')
            ),
            ["{d}"],
            "Error: {d}/t.jsonl: epoch line 1: epoch is 1.5, not an integer",
        ),
        (
            lambda d: (d / "t.jsonl").write_text(
                log_lines([(0.5, None)], run_meta()).replace('"epoch": 1', '"epoch": -1')
            ),
            ["{d}"],
            "Error: {d}/t.jsonl: epoch line 1: epoch is -1, not an integer >= 0",
        ),
        (
            lambda d: (d / "t.jsonl").write_text(log_lines([(0.5, None)], run_meta(seed=-1))),
            ["{d}"],
            "Error: {d}/t.jsonl: run: seed is -1, not an integer in 0..4294967295",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(1, 0, 2, 1.0, 2, 1.0, seed=1.5)]),
            ["{d}"],
            "Error: {d}/g.csv:2: column seed is not a whole number ('1.5')",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(-1, 0, 2, 1.0, 2, 1.0)]),
            ["{d}"],
            "Error: {d}/g.csv:2: column epoch is -1, not >= 0",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(1.5, 0, 2, 1.0, 2, 1.0)]),
            ["{d}"],
            "Error: {d}/g.csv:2: column epoch is not a whole number ('1.5')",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(1, 0, 2, -1.0, 2, 1.0)]),
            ["{d}"],
            "Error: {d}/g.csv:2: column noisy_grad_norm is '-1.0', not a finite number >= 0",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(1, 0, 2, 1.0, 2, 1.0, rate="inf")]),
            ["{d}"],
            "Error: {d}/g.csv:2: column noise_rate is 'inf', not a fraction in [0, 1]",
        ),
        (
            lambda d: write_gradstats(d / "g.csv", [grad_row(1, 0, 2, 1.0, 2, 1.0, rate=1.5)]),
            ["{d}"],
            "Error: {d}/g.csv:2: column noise_rate is '1.5', not a fraction in [0, 1]",
        ),
        (
            lambda d: write_gradstats(
                d / "g.csv",
                [
                    grad_row(1, 0, 2, 1.0, 2, 1.0),
                    grad_row(1, 1, 2, 1.0, 2, 1.0),
                    grad_row(1, 0, 2, 3.0, 2, 1.0),
                ],
            ),
            ["{d}"],
            "Error: {d}/g.csv:4: epoch 1, step 0 of run coop/ce seed 1 is listed twice (lines 2 and 4)",
        ),
        (
            lambda d: (d / "m.json").write_text("[" * 100_000 + "]" * 100_000),
            ["{d}/m.json"],
            "Error: {d}/m.json: JSON nested too deeply to read",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary()),
            ["{d}/missing"],
            "Error: {d}/missing: no such file",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary()),
            ["{d}", "-o", "{d}/r.txt"],
            "Error: {d}/r.txt: unknown report format '.txt' — name the output .html, .png, .svg, .pdf or .md",
        ),
        (
            lambda d: write_json(d / "m.json", eval_summary()),
            ["{d}", "--metric", "top3"],
            "Error: --metric: unknown value 'top3'",
        ),
    ],
    ids=[
        "empty",
        "nothing-usable",
        "truncated-json",
        "bad-log-line",
        "gradstats-columns",
        "gradstats-cell",
        "metric-null",
        "n-views-text",
        "init-std-text",
        "init-std-huge-int",
        "prompts-not-list",
        "labels-sha-list",
        "gradstats-int-overflow",
        "metric-over-one",
        "metric-huge-int",
        "nan",
        "noise-rate-over-one",
        "log-accuracy-over-one",
        "gradstats-short-row",
        "gradstats-repeated-column",
        "gradstats-field-limit",
        "seed-negative",
        "seed-fraction",
        "seed-huge",
        "shots-negative",
        "noise-seed-negative",
        "log-epoch-fraction",
        "log-epoch-negative",
        "log-seed-negative",
        "gradstats-seed-fraction",
        "gradstats-epoch-negative",
        "gradstats-epoch-fraction",
        "gradstats-norm-negative",
        "gradstats-rate-inf",
        "gradstats-rate-over-one",
        "gradstats-duplicate-step",
        "deep-json",
        "missing",
        "format",
        "metric",
    ],
)
def test_errors_are_one_line(tmp_path, run_cli, setup, args, message):
    d = tmp_path / "res"
    d.mkdir()
    setup(d)
    code, stdout, stderr = run_cli("report", *[a.format(d=d) for a in args])
    assert code == 2
    assert stderr.startswith(message.format(d=d)), stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == ""


def test_report_writes_svg_and_pdf(tmp_path, run_cli):
    write_json(tmp_path / "m.json", eval_summary())
    code, _, err = run_cli("report", tmp_path, "-o", tmp_path / "r.svg", "-o", tmp_path / "r.pdf", "-q")
    assert code == 0, err
    assert (tmp_path / "r.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")


def test_messages_and_table_cells_are_plain_text_not_markup(capsys):
    from promptcli.cli._output import Output

    out = Output()
    out.info("wrote data/[train]/x.png")
    out.warn("series coop + ce [tiny-clip] differs")
    out.table("t", ["method + loss", "0"], [["linear-probe + ce [promptcli-demo]", 0.5]])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "data/[train]/x.png" in text and "[tiny-clip]" in text and "[promptcli-demo]" in text


@pytest.mark.parametrize("rate", ["nan", "inf", "-1", "1.5"])
def test_curve_rate_must_be_a_noise_rate(tmp_path, run_cli, rate):
    code, _, stderr = run_cli("report", sweep(tmp_path / "results"), "--curve-rate", rate)
    assert code == 2 and "--curve-rate: must be a noise rate in [0, 1]" in stderr


def test_re_extracted_test_features_of_the_same_images_are_one_test_set(tmp_path):
    """finetune's protocol: each seed's test features come through its own tuned tower (other file bytes)."""
    test_set = {"source": "data/test", "source_digest": "bd" * 32, "n_images": 1000}
    for seed in (1, 2):
        summary = on_test(eval_summary("finetune", seed=seed, top1=0.5 + seed / 10), sha=f"{seed}f" * 32)
        write_json(tmp_path / f"ft{seed}.json", {**summary, "test_set": test_set})
    report = aggregate(read_results([tmp_path]))
    assert [(c["series"], c["n"]) for c in report.accuracy] == [("finetune + ce", 2)]
    assert not [w for w in report.warnings if "test sets" in w or "repeats" in w], report.warnings


def _on_images(summary: dict, images: str, listing: str = "bd" * 32) -> dict:
    """``summary`` on the test images ``data/test`` of listing digest ``listing`` and images' digest ``images``
    ("" for features extracted before it was recorded)."""
    test_set = {"source": "data/test", "source_digest": listing, "n_images": 30}
    return {**summary, "test_set": {**test_set, "images_digest": images} if images else test_set}


def test_other_images_under_the_same_names_are_another_test_set_and_no_repeat(tmp_path, run_cli):
    """One prompt scored on two folders of other images under the same file names: two evaluations, two test
    sets (the audit: one was dropped as a repeat); each seed's own extraction of one set of images pools."""
    plain = on_test(eval_summary(seed=1, top1=0.5), sha="aa" * 32, prompt="c1" * 32)
    inverted = on_test(eval_summary(seed=1, top1=0.6), sha="bb" * 32, prompt="c1" * 32)
    write_json(tmp_path / "new" / "eP.json", _on_images(plain, "11" * 32))
    write_json(tmp_path / "new" / "eI.json", _on_images(inverted, "22" * 32))
    report = aggregate(read_results([tmp_path / "new"]))
    assert sorted(c["mean"] for c in report.accuracy) == [0.5, 0.6]
    assert not [w for w in report.warnings if "repeats" in w], report.warnings
    assert any(w.startswith("results are on 2 test sets") for w in report.warnings)

    # features extracted before the images' digest was recorded: told apart by their features files
    write_json(tmp_path / "old" / "eP.json", _on_images(plain, ""))
    write_json(tmp_path / "old" / "eI.json", _on_images(inverted, ""))
    report = aggregate(read_results([tmp_path / "old"]))
    assert sorted(c["mean"] for c in report.accuracy) == [0.5, 0.6]
    assert any("no record of the images' content: counted as 2 test sets" in w for w in report.warnings)
    code, _, stderr = run_cli("report", tmp_path / "old")
    assert code == 0 and "repeats the evaluation" not in stderr, stderr

    # finetune: each seed re-extracts the same images through its tower (other features, same images)
    for seed in (1, 2):
        summary = on_test(eval_summary("finetune", seed=seed, top1=0.5 + seed / 10), sha=f"{seed}f" * 32)
        write_json(tmp_path / "ft" / f"ft{seed}.json", _on_images(summary, "11" * 32))
    report = aggregate(read_results([tmp_path / "ft"]))
    assert [(c["series"], c["n"]) for c in report.accuracy] == [("finetune + ce", 2)]
    assert not [w for w in report.warnings if "test sets" in w or "repeats" in w], report.warnings


def test_a_prompt_rewritten_after_its_evaluation_is_warned_about(tmp_path):
    import hashlib

    prompt = tmp_path / "p.safetensors"
    prompt.write_bytes(b"the prompt that was scored")
    sha = hashlib.sha256(prompt.read_bytes()).hexdigest()
    summary = {**eval_summary(seed=1, top1=0.5), "prompts": [{"path": "p.safetensors", "sha256": sha}]}
    write_json(tmp_path / "res" / "e.json", {**summary, "cwd": str(tmp_path)})
    write_json(tmp_path / "res" / "old.json", {**summary, "seed": 2})  # no cwd on record: not checked
    assert not [w for w in read_results([tmp_path / "res"]).warnings if "rewritten" in w]
    prompt.write_bytes(b"retuned on regenerated labels")
    warnings = [w for w in read_results([tmp_path / "res"]).warnings if "rewritten" in w]
    assert warnings == [
        f"{tmp_path / 'res' / 'e.json'}: its prompt {prompt} was rewritten after this evaluation (SHA-256 "
        f"{sha[:8]} then, another now): the score is the earlier prompt's; evaluate the current one again"
    ]


def test_one_prompt_on_two_extractions_of_the_same_images_is_one_evaluation(tmp_path):
    """Other features files (extracted twice), the same images by their bytes: a repeat, counted once."""
    for name, sha in (("e1", "a1" * 32), ("e2", "a2" * 32)):
        summary = on_test(eval_summary(seed=1, top1=0.5), sha=sha, prompt="c1" * 32)
        write_json(tmp_path / f"{name}.json", _on_images(summary, "11" * 32))
    report = aggregate(read_results([tmp_path]))
    assert [(c["series"], c["n"]) for c in report.accuracy] == [("coop + ce", 1)]
    assert any("repeats the evaluation" in w for w in report.warnings), report.warnings


def test_a_prompt_scored_on_the_features_it_was_tuned_on_is_kept_out_of_the_means(tmp_path):
    for seed in (1, 2):
        summary = on_test(eval_summary(seed=seed, top1=0.5), sha="4c" * 32)
        write_json(tmp_path / f"s{seed}.json", summary)
    recorded = on_test(eval_summary(seed=3, top1=0.9), sha="4c" * 32)
    write_json(tmp_path / "recorded.json", {**recorded, "tuned_on_test": True})
    older = on_test(eval_summary(seed=4, top1=0.95), sha="4c" * 32)  # before eval recorded it
    older["prompts"][0]["features_sha256"] = "4c" * 32
    write_json(tmp_path / "older.json", older)
    report = aggregate(read_results([tmp_path]))
    cells = {c["series"]: (c["n"], c["mean"]) for c in report.accuracy}
    assert cells == {
        "coop + ce": (2, pytest.approx(0.5)),
        "coop + ce, tuned on the test features": (2, pytest.approx(0.925)),
    }
    for name in ("recorded.json", "older.json"):
        assert any(
            w.startswith(f"{tmp_path / name}: its prompt was tuned on the features") for w in report.warnings
        )


def test_settings_tune_records_split_series_and_class_chunk_does_not(tmp_path):
    config = {"prompt.init_std": "0.02", "prompt.n_ctx": "16"}
    runs = {
        "default": ({**COOP_SETTINGS, "prompt_config": config, "use_views": False, "n_views": 0}, 0.5),
        "chunked": (
            {**COOP_SETTINGS, "prompt_config": config, "use_views": False, "n_views": 0, "class_chunk": 10},
            0.5,
        ),
        "older": (COOP_SETTINGS, 0.5),  # an eval summary from before init_std was recorded: the default
        "std": ({**COOP_SETTINGS, "prompt_config": {**config, "prompt.init_std": "0.5"}}, 0.2),
        "views": ({**COOP_SETTINGS, "prompt_config": config, "use_views": True, "n_views": 4}, 0.7),
    }
    for seed, (name, (settings, top1)) in enumerate(runs.items(), start=1):
        write_json(tmp_path / f"{name}.json", on_test(eval_summary(seed=seed, top1=top1), **settings))
    report = aggregate(read_results([tmp_path]))
    cells = {c["series"]: c["n"] for c in report.accuracy}
    assert cells == {
        "coop (init_std=0.02, views=0) + ce": 2,
        "coop (init_std=0.02, views=4) + ce": 1,
        "coop (init_std=0.02, views=?) + ce": 1,
        "coop (init_std=0.5, views=?) + ce": 1,
    }, cells


def test_wise_ft_and_lp_ft_are_their_own_series(tmp_path):
    for seed, (extra, top1) in enumerate(
        [
            ({"train_layers": "all", "lp_ft": False, "wise_alpha": 1.0}, 0.5),
            ({"train_layers": "all", "lp_ft": False, "wise_alpha": 0.5}, 0.6),
            ({"train_layers": "all", "lp_ft": True, "wise_alpha": 1.0}, 0.7),
        ],
        start=1,
    ):
        write_json(
            tmp_path / f"ft{seed}.json", on_test(eval_summary("finetune", seed=seed, top1=top1), **extra)
        )
    report = aggregate(read_results([tmp_path]))
    assert sorted(c["series"] for c in report.accuracy) == [
        "finetune (lp_ft=False, wise_alpha=0.5) + ce",
        "finetune (lp_ft=False, wise_alpha=1) + ce",
        "finetune (lp_ft=True, wise_alpha=1) + ce",
    ]


def test_tip_adapter_files_with_and_without_an_optimiser_are_one_series(tmp_path):
    """tip-adapter is training-free: older files record the SGD block it never used, newer ones none."""
    old = on_test(eval_summary("tip-adapter", seed=1, top1=0.6), optimizer=SCHEDULE)
    new = on_test(eval_summary("tip-adapter", seed=2, top1=0.62), optimizer=None)
    write_json(tmp_path / "old.json", old)
    write_json(tmp_path / "new.json", {**new, "runtime": {"device": "cpu"}, "cwd": "/x", "git": None})
    report = aggregate(read_results([tmp_path]))
    assert {c["series"]: c["n"] for c in report.accuracy} == {"tip-adapter + ce": 2}, report.warnings
    assert not report.warnings, report.warnings


def test_documents_name_the_commit_and_working_directory_when_recorded(tmp_path):
    write_json(tmp_path / "m.json", eval_summary())
    report = aggregate(read_results([tmp_path]))
    base = {"promptcli_version": "0.1.0", "created": "now", "command": "promptcli report ."}
    old = reporting.render_markdown(report, base, "t")
    assert "git commit" not in old and "cwd" not in old  # provenance from before these were recorded
    git = {"commit": "ab" * 20, "dirty": True}
    new = reporting.render_markdown(report, {**base, "cwd": "/runs", "git": git}, "t")
    assert f"- git commit: {'ab' * 20} (uncommitted changes)" in new and "- cwd: /runs" in new
    clean = reporting.render_html(report, {**base, "git": {**git, "dirty": False}}, "t", None)
    assert f"<code>{'ab' * 20}</code>" in clean and "uncommitted" not in clean


def test_a_csv_beside_the_results_with_an_overlong_first_field_is_skipped(tmp_path, run_cli):
    """A file that is no result is skipped when a folder is read, even one the csv module cannot parse."""
    write_json(tmp_path / "m.json", eval_summary())
    (tmp_path / "notes.csv").write_text("x" * 200_000 + "\n")
    code, _, err = run_cli("report", tmp_path, "--json", "-q")
    assert code == 0, err
