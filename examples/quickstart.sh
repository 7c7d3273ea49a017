#!/usr/bin/env bash
# promptcli quick start: the whole pipeline on the bundled demo, offline, on CPU (about 15 minutes on 2 cores).
#
#   model   promptcli-demo: ImageNet EfficientNet-Lite0 + MiniLM sentence encoder, aligned without
#           image-text pairs (docs/demo-model.md); built on first use from the `demo` extra
#   data    a Fashion-MNIST subset shipped in the package: 200 train / 100 test images per class
#
# extract -> zero-shot eval -> corrupt (16 shots, symmetric, 0% and 50%) -> tune (coop+ce, coop+gce,
# linear-probe) -> eval -> pseudolabel --method transductive -> unsupervised linear probe -> eval -> one table.
# Every step is a plain promptcli command; finished steps are skipped when the script is rerun, and
# interrupted ones (extract, tune) continue where they stopped (--resume).
#
# Settings (environment variables): OUT (output folder), EPOCHS, SEED, SHOTS, RATES, DEVICE,
# PER_CLASS (use only the first N demo images per class and split: a quicker, smaller run).
set -euo pipefail

OUT=${OUT:-promptcli-demo}
EPOCHS=${EPOCHS:-50}
SEED=${SEED:-1}
SHOTS=${SHOTS:-16}
RATES=${RATES:-"0 0.5"}
DEVICE=${DEVICE:-auto}
PER_CLASS=${PER_CLASS:-}
MODEL=(--model promptcli-demo)
mkdir -p "$OUT/runs" "$OUT/results"

if [ -t 2 ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }  # bold on a terminal
else
  step() { printf '\n== %s\n' "$*" >&2; }                  # plain text in a log file
fi
todo() { [ ! -e "$1" ]; }  # a step runs only when its output is missing

step "Demo images (Fashion-MNIST subset) -> $OUT/images"
promptcli demo-images "$OUT/images" ${PER_CLASS:+--per-class "$PER_CLASS"}

step "Extract image features"
for split in train test; do
  todo "$OUT/$split.h5" && promptcli extract "$OUT/images/$split" -o "$OUT/$split.h5" "${MODEL[@]}" --device "$DEVICE" --resume
done

step "Zero-shot CLIP on the test set"
todo "$OUT/results/zero-shot.json" &&
  promptcli eval "$OUT/test.h5" --zero-shot --template "a photo of a {}." -o "$OUT/results/zero-shot.json" -q

for rate in $RATES; do
  step "Noisy few-shot training set: $SHOTS shots per class, ${rate} symmetric noise"
  labels="$OUT/runs/labels-r$rate-s$SEED.csv"
  todo "$labels" && promptcli corrupt "$OUT/train.h5" --shots "$SHOTS" --rate "$rate" --type symmetric \
    --seed "$SEED" -o "$labels"
  for run in "coop ce" "coop gce" "linear-probe ce"; do
    set -- $run
    name="$1-$2-r$rate-s$SEED"
    step "Tune $1 with $2 loss on ${rate} noise"
    todo "$OUT/runs/$name.safetensors" && promptcli tune "$OUT/train.h5" "$labels" -o "$OUT/runs/$name.safetensors" \
      --method "$1" --loss "$2" --epochs "$EPOCHS" --seed "$SEED" --device "$DEVICE" --log "$OUT/runs/$name.jsonl" --resume
    todo "$OUT/results/$name.json" &&
      promptcli eval "$OUT/test.h5" --prompt "$OUT/runs/$name.safetensors" -o "$OUT/results/$name.json" -q
  done
done

step "Unsupervised: every training image labelled by a mixture model (zero-shot prior + the images' clusters), then a linear probe on those labels"
todo "$OUT/runs/pseudo.csv.json" && promptcli pseudolabel "$OUT/train.h5" --method transductive -o "$OUT/runs/pseudo.csv" --force
todo "$OUT/runs/unsupervised-linear-probe.safetensors" && promptcli tune "$OUT/train.h5" "$OUT/runs/pseudo.csv" \
  -o "$OUT/runs/unsupervised-linear-probe.safetensors" --method linear-probe --epochs "$EPOCHS" --seed "$SEED" --device "$DEVICE" --resume
todo "$OUT/results/unsupervised-linear-probe.json" && promptcli eval "$OUT/test.h5" \
  --prompt "$OUT/runs/unsupervised-linear-probe.safetensors" -o "$OUT/results/unsupervised-linear-probe.json" -q

step "Results (test accuracy; report files in $OUT/report.*)"
promptcli report "$OUT/results" "$OUT"/runs/*.jsonl -o "$OUT/report.html" -o "$OUT/report.png" -o "$OUT/report.md" --force -q
promptcli report "$OUT/results"
