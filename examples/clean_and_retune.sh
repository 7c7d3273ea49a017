#!/usr/bin/env bash
# Find the mislabelled samples and train again without them, on the bundled demo (offline, CPU):
#   tune with GCE on noisy labels -> clean (score every row, keep the likely-correct ones)
#   -> tune again on the kept rows -> eval both prompts and zero-shot -> one table.
# Settings (environment variables): OUT, RATE (symmetric noise, default 0.5), SEED, SHOTS, EPOCHS,
# KEEP (fraction of rows to keep; empty: keep rows whose label is the prompt's top class), DEVICE,
# PER_CLASS (use only the first N demo images per class and split).
set -euo pipefail

OUT=${OUT:-promptcli-clean-demo}
RATE=${RATE:-0.5}
SEED=${SEED:-1}
SHOTS=${SHOTS:-16}
EPOCHS=${EPOCHS:-50}
KEEP=${KEEP:-}
DEVICE=${DEVICE:-auto}
PER_CLASS=${PER_CLASS:-}
TUNE=(--loss gce --ctx-init "a photo of a" --lr 0.02 --epochs "$EPOCHS" --seed "$SEED" --device "$DEVICE" --resume -q)
mkdir -p "$OUT/results"

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
todo() { [ ! -e "$1" ]; }

step "Demo images and features"
promptcli demo-images "$OUT/images" ${PER_CLASS:+--per-class "$PER_CLASS"}
for split in train test; do
  todo "$OUT/$split.h5" && promptcli extract "$OUT/images/$split" -o "$OUT/$split.h5" --model promptcli-demo \
    --device "$DEVICE" --resume
done
todo "$OUT/results/zero-shot.json" && promptcli eval "$OUT/test.h5" --zero-shot -o "$OUT/results/zero-shot.json" -q

step "Noisy training set: $SHOTS shots per class, $RATE symmetric noise"
todo "$OUT/noisy.csv" && promptcli corrupt "$OUT/train.h5" --shots "$SHOTS" --rate "$RATE" --seed "$SEED" -o "$OUT/noisy.csv"

step "1. Tune with GCE on the noisy labels"
todo "$OUT/gce.safetensors" && promptcli tune "$OUT/train.h5" "$OUT/noisy.csv" -o "$OUT/gce.safetensors" "${TUNE[@]}"
todo "$OUT/results/gce.json" && promptcli eval "$OUT/test.h5" --prompt "$OUT/gce.safetensors" -o "$OUT/results/gce.json" -q

step "2. Clean: score every label with the tuned prompt, keep the likely-correct rows"
todo "$OUT/kept.csv" && promptcli clean "$OUT/train.h5" "$OUT/noisy.csv" --prompt "$OUT/gce.safetensors" \
  -o "$OUT/scores.csv" --clean-out "$OUT/kept.csv" ${KEEP:+--keep-fraction "$KEEP"}

step "3. Tune again on the kept rows"
todo "$OUT/retuned.safetensors" && promptcli tune "$OUT/train.h5" "$OUT/kept.csv" -o "$OUT/retuned.safetensors" "${TUNE[@]}"
todo "$OUT/results/retuned.json" && promptcli eval "$OUT/test.h5" --prompt "$OUT/retuned.safetensors" \
  -o "$OUT/results/retuned.json" -q

step "Results (test accuracy)"
promptcli report "$OUT/results" -o "$OUT/report.html" -o "$OUT/report.png" --force -q
promptcli report "$OUT/results"
