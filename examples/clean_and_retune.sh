#!/usr/bin/env bash
# Find the mislabelled samples and train again on corrected labels, on the bundled demo (offline, CPU):
#   tune with GCE on noisy labels -> clean (score every row; relabel or drop the likely-wrong ones)
#   -> tune again on the cleaned rows -> eval both prompts and zero-shot.
# Settings (environment variables): OUT, RATE (symmetric noise, default 0.5), SEED, SHOTS, EPOCHS,
# SCORE (posterior: the noise-model posterior [default]; margin: the classifier's margin),
# PRIOR (the classifier clean uses: zero-shot [default], its evidence weights fitted to the labels;
# or prompt: the GCE prompt of step 1, which has seen the labels), RELABEL (1: relabel suspects to
# the predicted class [default]; 0: drop them), KEEP (fraction of rows to keep instead of the
# score's threshold), DEVICE, PER_CLASS (use only the first N demo images per class and split).
# Measured over 3 seeds (docs/cleaning.md), test accuracy of the GCE prompt -> the retuned one with
# the defaults: 59.8 -> 68.7 at 50% noise, 49.2 -> 61.3 at 75% (per seed +10.8, +18.3, +7.4).
set -euo pipefail

OUT=${OUT:-promptcli-clean-demo}
RATE=${RATE:-0.5}
SEED=${SEED:-1}
SHOTS=${SHOTS:-16}
EPOCHS=${EPOCHS:-50}
SCORE=${SCORE:-posterior}
PRIOR=${PRIOR:-zero-shot}
RELABEL=${RELABEL:-1}
KEEP=${KEEP:-}
DEVICE=${DEVICE:-auto}
PER_CLASS=${PER_CLASS:-}
TUNE=(--loss gce --epochs "$EPOCHS" --seed "$SEED" --device "$DEVICE" --resume -q)
CLEAN=(--score "$SCORE" ${KEEP:+--keep-fraction "$KEEP"})
if [[ "$RELABEL" == 1 ]]; then CLEAN+=(--relabel); fi
case "$PRIOR" in
  zero-shot) CLEAN+=(--zero-shot) ;;
  prompt) CLEAN+=(--prompt "$OUT/gce.safetensors") ;;
  *) echo "PRIOR must be zero-shot or prompt, got '$PRIOR'" >&2; exit 2 ;;
esac
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

step "2. Clean: score every label ($SCORE, $PRIOR prior), relabel or drop the likely-wrong rows"
# --force: scores.csv is written before kept.csv, so a run stopped between the two leaves scores.csv alone
todo "$OUT/kept.csv" && promptcli clean "$OUT/train.h5" "$OUT/noisy.csv" -o "$OUT/scores.csv" \
  --clean-out "$OUT/kept.csv" "${CLEAN[@]}" --force

step "3. Tune again on the cleaned rows"
todo "$OUT/retuned.safetensors" && promptcli tune "$OUT/train.h5" "$OUT/kept.csv" -o "$OUT/retuned.safetensors" "${TUNE[@]}"
todo "$OUT/results/retuned.json" && promptcli eval "$OUT/test.h5" --prompt "$OUT/retuned.safetensors" \
  -o "$OUT/results/retuned.json" -q

step "Results (test accuracy)"
promptcli report "$OUT/results" -o "$OUT/report.html" -o "$OUT/report.png" --force -q
promptcli report "$OUT/results"
