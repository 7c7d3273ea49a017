#!/usr/bin/env bash
# The paper's protocol over the CoOp benchmark datasets found under $DATA: for every dataset, write its
# train and test image lists (`promptcli dataset`), extract features once per split; then for every
# noise rate and seed build a 16-shot noisy training set (`corrupt --shots`), tune CoOp + CE,
# CoOp + GCE and a linear probe, evaluate on the test split next to zero-shot CLIP; one report per
# dataset, and one summary table over all of them.
#
# For a GPU machine with real CLIP weights (datasets laid out as CoOp's DATASETS.md says):
#
#     DATA=~/data examples/benchmark.sh                        # -> benchmark/summary.md
#     DATA=~/data DATASETS="dtd eurosat" SEEDS=1 RATES="0 0.5" EPOCHS=50 examples/benchmark.sh
#
# Environment variables (defaults in brackets):
#   DATA        folder holding the datasets (caltech-101/, oxford_pets/, ...) [required]
#   OUT         output folder [benchmark]
#   DATASETS    dataset layouts to run, when present under $DATA
#               ["caltech101 oxford-pets stanford-cars oxford-flowers food101 fgvc-aircraft sun397 dtd eurosat ucf101"];
#               add imagenet for CoOp's eleventh (its 1.28M training images are extracted in full)
#   MODEL       open_clip model name [RN50]
#   PRETRAINED  pretrained tag or checkpoint file [openai]
#   MODEL_ARGS  extra model flags for extract, e.g. "--model-config my.json" []
#   DEVICE      auto, cpu, cuda or cuda:N [auto]
#   VIEWS       augmented views per training image (extract --views) [0]
#   RATES       noise rates ["0 0.125 0.25 0.5 0.625 0.75"]
#   NOISE_TYPE  symmetric or pair [symmetric]
#   SEEDS       seeds (of the noise, the shot sample and training) ["1 2 3"]
#   SHOTS       labelled images per class [16]
#   EPOCHS      training epochs [200: CoOp's schedule for 16 shots]
#   METHODS     method+loss pairs ["coop+ce coop+gce linear-probe+ce"]
#   TUNE_ARGS   extra flags for tune, e.g. "--n-ctx 4" []
#   PROMPTCLI   how to run promptcli ["promptcli"]
#   PYTHON      the Python that writes the summary table [python3]
#
# Work already done is skipped (every output is written atomically, so it exists only when complete);
# interrupted extractions and tunes resume. A dataset's folder is $OUT/<layout>/, the summary
# $OUT/summary.md (and .json).
set -euo pipefail

DATA=${DATA:?set DATA to the folder holding the CoOp datasets}
OUT=${OUT:-benchmark}
DATASETS=${DATASETS:-caltech101 oxford-pets stanford-cars oxford-flowers food101 fgvc-aircraft sun397 dtd eurosat ucf101}
MODEL=${MODEL:-RN50}
PRETRAINED=${PRETRAINED-openai}
MODEL_ARGS=${MODEL_ARGS:-}
DEVICE=${DEVICE:-auto}
VIEWS=${VIEWS:-0}
RATES=${RATES:-0 0.125 0.25 0.5 0.625 0.75}
NOISE_TYPE=${NOISE_TYPE:-symmetric}
SEEDS=${SEEDS:-1 2 3}
SHOTS=${SHOTS:-16}
EPOCHS=${EPOCHS:-200}
METHODS=${METHODS:-coop+ce coop+gce linear-probe+ce}
TUNE_ARGS=${TUNE_ARGS:-}
PROMPTCLI=${PROMPTCLI:-promptcli}
PYTHON=${PYTHON:-python3}

# The folder CoOp's DATASETS.md gives each dataset under $DATA.
declare -A FOLDER=(
    [caltech101]=caltech-101 [oxford-pets]=oxford_pets [stanford-cars]=stanford_cars
    [oxford-flowers]=oxford_flowers [food101]=food-101 [fgvc-aircraft]=fgvc_aircraft [sun397]=sun397
    [dtd]=dtd [eurosat]=eurosat [ucf101]=ucf101 [imagenet]=imagenet
)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for name in $DATASETS; do # every name checked before hours of work start
    if [[ -z "${FOLDER[$name]:-}" ]]; then
        echo "unknown dataset '$name' (known: ${!FOLDER[*]})" >&2
        exit 2
    fi
done

done_sets=()
for name in $DATASETS; do
    folder=${FOLDER[$name]}
    if [[ ! -d "$DATA/$folder" ]]; then
        echo "absent: $DATA/$folder (skipping $name)"
        continue
    fi
    dir=$OUT/$name
    mkdir -p "$dir/features" "$dir/labels" "$dir/prompts" "$dir/results"
    ran_before=$ran

    # The image lists: train and test splits, one class list (label order) shared by both extractions.
    run "$dir/classes.txt" "${cli[@]}" dataset "$name" "$DATA/$folder" --split train -o "$dir/train.csv" \
        --classnames-out "$dir/classes.txt" --force -q
    run "$dir/test.csv.json" "${cli[@]}" dataset "$name" "$DATA/$folder" --split test -o "$dir/test.csv" --force -q

    train_h5=$dir/features/train.h5
    test_h5=$dir/features/test.h5
    run "$train_h5" "${cli[@]}" extract "$dir/train.csv" -o "$train_h5" --classnames "$dir/classes.txt" \
        --model "$MODEL" "${model_args[@]}" --device "$DEVICE" --views "$VIEWS" --resume -q
    run "$test_h5" "${cli[@]}" extract "$dir/test.csv" -o "$test_h5" --classnames "$dir/classes.txt" \
        --model "$MODEL" "${model_args[@]}" --device "$DEVICE" --resume -q
    run "$dir/results/zero-shot.json" "${cli[@]}" eval "$test_h5" --zero-shot --device "$DEVICE" \
        -o "$dir/results/zero-shot.json" -q

    for rate in $RATES; do
        for seed in $SEEDS; do
            tag=r${rate}_s${seed}
            labels=$dir/labels/$tag.csv
            # corrupt writes the CSV, then its sidecar: the sidecar marks it complete
            run "$labels.json" "${cli[@]}" corrupt "$train_h5" --shots "$SHOTS" --rate "$rate" \
                --type "$NOISE_TYPE" --seed "$seed" -o "$labels" --force -q
            for pair in $METHODS; do
                method=${pair%+*} loss=${pair#*+}
                prompt=$dir/prompts/${method}_${loss}_$tag.safetensors
                run "$prompt" "${cli[@]}" tune "$train_h5" "$labels" -o "$prompt" --method "$method" \
                    --loss "$loss" --epochs "$EPOCHS" --seed "$seed" --device "$DEVICE" "${tune_args[@]}" \
                    --resume -q
                result=$dir/results/${method}_${loss}_$tag.json
                run "$result" "${cli[@]}" eval "$test_h5" --prompt "$prompt" --device "$DEVICE" -o "$result" -q
            done
        done
    done

    reports=("$dir/report.html" "$dir/report.png" "$dir/report.md")
    if ((ran == ran_before)) && [[ -e "$dir/report.json" && -e "${reports[0]}" && -e "${reports[2]}" ]]; then
        echo "skip: the $name report is up to date"
    else
        echo "run: report -> $dir/report.*"
        "${cli[@]}" report "$dir/results" -o "${reports[0]}" -o "${reports[1]}" -o "${reports[2]}" --force \
            --title "$name: $MODEL, $SHOTS shots, $NOISE_TYPE noise" --json -q >"$dir/report.json.tmp"
        mv "$dir/report.json.tmp" "$dir/report.json"
        ran=$((ran + 1))
    fi
    done_sets+=("$name")
done

if ((${#done_sets[@]} == 0)); then
    echo "no dataset of DATASETS found under $DATA" >&2
    exit 2
fi

if ((ran == 0)) && [[ -e "$OUT/summary.md" && -e "$OUT/summary.json" ]]; then
    echo "skip: the summary is up to date"
else
    echo "run: summary -> $OUT/summary.md"
    # One table: a row per dataset and method (zero-shot included), a column per noise rate, cells
    # "mean ± std (runs)" in percent from each dataset's report; then the mean over the datasets that
    # have every rate of a method.
    "$PYTHON" - "$OUT" "${done_sets[@]}" <<'PY'
import json, os, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
cells, zero, rates = {}, {}, set()
for name in names:
    report = json.loads((out / name / "report.json").read_text())
    for c in report["accuracy"]:
        if c["noise_rate"] is None:  # "noise unknown": benchmark runs always corrupt, so none should be here
            print(f"{name}: {c['series']} has runs of unknown noise; left out", file=sys.stderr)
            continue
        rate = float(c["noise_rate"])
        rates.add(rate)
        cells[(name, c["series"], rate)] = c
    for z in report["zero_shot"]:
        zero[(name, z["label"])] = z
rates = sorted(rates)
series = sorted({s for _, s, _ in cells})


def fmt(c):
    if c is None:
        return "—"
    text = f"{100 * c['mean']:.1f}"
    if c.get("std") is not None:
        text += f" ± {100 * c['std']:.1f}"
    return f"{text} ({c['n']})"


header = ["dataset", "method + loss"] + [f"{r:g}" for r in rates]
lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(rates)]
summary = {"datasets": names, "rates": rates, "rows": []}
for name in names:
    for s in series:
        row = [cells.get((name, s, r)) for r in rates]
        if any(row):
            lines.append("| " + " | ".join([name, s] + [fmt(c) for c in row]) + " |")
            summary["rows"].append({"dataset": name, "series": s, "cells": [c and {k: c[k] for k in ("mean", "std", "n")} for c in row]})
    for (n, label), z in zero.items():
        if n == name:
            lines.append("| " + " | ".join([name, label] + [fmt(z)] * len(rates)) + " |")
            summary["rows"].append({"dataset": name, "series": label, "cells": [{k: z[k] for k in ("mean", "std", "n")}]})
for s in series:
    means = []
    for r in rates:
        got = [cells[(n, s, r)]["mean"] for n in names if (n, s, r) in cells]
        means.append(sum(got) / len(got) if len(got) == len(names) else None)
    if any(m is not None for m in means):
        lines.append("| " + " | ".join([f"mean of {len(names)}", s] + ["—" if m is None else f"{100 * m:.1f}" for m in means]) + " |")
        summary["rows"].append({"dataset": "mean", "series": s, "means": means})
text = "Test top-1 accuracy (%) by label-noise rate: mean ± std over seeds (runs).\n\n" + "\n".join(lines) + "\n"
for path, body in ((out / "summary.md", text), (out / "summary.json", json.dumps(summary, indent=1) + "\n")):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(body)
    os.replace(tmp, path)
print(text)
PY
fi
echo "done: $OUT/summary.md"
