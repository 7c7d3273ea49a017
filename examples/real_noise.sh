#!/usr/bin/env bash
# Prompt tuning on real label noise (Clothing1M or Food-101N), cleaned and tuned again:
#   dataset (the training images whose label the release verified, and the clean test split)
#   -> extract -> a K-shot training set drawn from the real noisy labels (`corrupt --shots K --rate 0`:
#   no noise added, the release's is_noisy kept) -> tune with GCE -> clean (score every label; its
#   detection AUROC is measured against the release's own flags) -> tune again on the kept rows
#   -> eval both and zero-shot on the clean test split -> report.
#
#     DATASET=clothing1m ROOT=~/data/clothing1m examples/real_noise.sh
#     DATASET=food101n ROOT=~/data/Food-101N_release TEST_ROOT=~/data/food-101 examples/real_noise.sh
#
# Environment variables (defaults in brackets):
#   DATASET     clothing1m or food101n [clothing1m]
#   ROOT        the release's folder [required]
#   TEST_ROOT   food101n only: the food-101 folder (its test split is the clean test set) []
#   OUT         output folder [real-noise-$DATASET]
#   MODEL, PRETRAINED, MODEL_ARGS, DEVICE   as in benchmark.sh [RN50, openai, "", auto]
#   SHOTS       rows per given label ("" trains on every verified training row) [16]
#   SEEDS       seeds of the shot sample and training ["1 2 3"]
#   EPOCHS      training epochs [200]
#   SCORE       clean --score: posterior or margin [posterior]
#   RELABEL     1: relabel suspects to the predicted class (needs clean_label, so clothing1m only);
#               0: drop them [1 for clothing1m, 0 for food101n]
#   PROMPTCLI   how to run promptcli ["promptcli"]
set -euo pipefail

DATASET=${DATASET:-clothing1m}
ROOT=${ROOT:?set ROOT to the $DATASET release folder}
TEST_ROOT=${TEST_ROOT:-}
OUT=${OUT:-real-noise-$DATASET}
MODEL=${MODEL:-RN50}
PRETRAINED=${PRETRAINED-openai}
MODEL_ARGS=${MODEL_ARGS:-}
DEVICE=${DEVICE:-auto}
SHOTS=${SHOTS-16}
SEEDS=${SEEDS:-1 2 3}
EPOCHS=${EPOCHS:-200}
SCORE=${SCORE:-posterior}
PROMPTCLI=${PROMPTCLI:-promptcli}
case "$DATASET" in
    clothing1m) RELABEL=${RELABEL:-1}; dataset_args=() ;;
    food101n)
        RELABEL=${RELABEL:-0}
        : "${TEST_ROOT:?food101n needs TEST_ROOT, the food-101 folder whose test split is the clean test set}"
        dataset_args=(--test-root "$TEST_ROOT")
        ;;
    *) echo "DATASET must be clothing1m or food101n, got '$DATASET'" >&2; exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
clean_args=(--zero-shot --score "$SCORE")
if [[ "$RELABEL" == 1 ]]; then clean_args+=(--relabel); fi

mkdir -p "$OUT/features" "$OUT/labels" "$OUT/prompts" "$OUT/results" "$OUT/clean"
run "$OUT/classes.txt" "${cli[@]}" dataset "$DATASET" "$ROOT" "${dataset_args[@]}" --split train --known-noise \
    -o "$OUT/train.csv" --classnames-out "$OUT/classes.txt" --force -q
run "$OUT/test.csv.json" "${cli[@]}" dataset "$DATASET" "$ROOT" "${dataset_args[@]}" --split test \
    -o "$OUT/test.csv" --force -q
train_h5=$OUT/features/train.h5
test_h5=$OUT/features/test.h5
run "$train_h5" "${cli[@]}" extract "$OUT/train.csv" -o "$train_h5" --classnames "$OUT/classes.txt" \
    --model "$MODEL" "${model_args[@]}" --device "$DEVICE" --resume -q
run "$test_h5" "${cli[@]}" extract "$OUT/test.csv" -o "$test_h5" --classnames "$OUT/classes.txt" \
    --model "$MODEL" "${model_args[@]}" --device "$DEVICE" --resume -q
run "$OUT/results/zero-shot.json" "${cli[@]}" eval "$test_h5" --zero-shot --device "$DEVICE" \
    -o "$OUT/results/zero-shot.json" -q

tune=(--loss gce --epochs "$EPOCHS" --device "$DEVICE" --resume -q)
for seed in $SEEDS; do
    labels=$OUT/labels/s$seed.csv
    if [[ -n "$SHOTS" ]]; then
        run "$labels.json" "${cli[@]}" corrupt "$OUT/train.csv" --features "$train_h5" --shots "$SHOTS" --rate 0 \
            --seed "$seed" -o "$labels" --force -q
    else
        labels=$OUT/train.csv
    fi
    noisy=$OUT/prompts/gce_s$seed.safetensors
    run "$noisy" "${cli[@]}" tune "$train_h5" "$labels" -o "$noisy" --seed "$seed" "${tune[@]}"
    run "$OUT/results/gce_s$seed.json" "${cli[@]}" eval "$test_h5" --prompt "$noisy" --device "$DEVICE" \
        -o "$OUT/results/gce_s$seed.json" -q
    kept=$OUT/clean/kept_s$seed.csv
    run "$kept.json" "${cli[@]}" clean "$train_h5" "$labels" -o "$OUT/clean/scores_s$seed.csv" --clean-out "$kept" \
        "${clean_args[@]}" --device "$DEVICE" --force -q
    retuned=$OUT/prompts/retuned_s$seed.safetensors
    run "$retuned" "${cli[@]}" tune "$train_h5" "$kept" -o "$retuned" --seed "$seed" "${tune[@]}"
    run "$OUT/results/retuned_s$seed.json" "${cli[@]}" eval "$test_h5" --prompt "$retuned" --device "$DEVICE" \
        -o "$OUT/results/retuned_s$seed.json" -q
done

"${cli[@]}" report "$OUT/results" -o "$OUT/report.html" -o "$OUT/report.md" -o "$OUT/report.png" --force \
    --title "$DATASET (real label noise): $MODEL" -q
echo "detection against the release's is_noisy: $OUT/clean/scores_s*.csv.json (detection.auroc)"
echo "done: $OUT/report.md"
