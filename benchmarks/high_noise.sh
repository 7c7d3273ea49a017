#!/usr/bin/env bash
# High-noise comparison (issue 8): on top of a finished examples/noise_sweep.sh run (its features,
# labels and coop+gce prompts), train at 50% and 75% symmetric noise with
#   coop+gce --split ot, coop+ce --split ot  (clean/noisy split each epoch, MAE on the noisy part)
#   clean-and-retune: clean with the sweep's coop+gce prompt, tune coop+gce again on the kept rows;
#     and with --score posterior --relabel (the prompt as the noise model's prior, fixed weights)
#   posterior relabel-and-retune: clean --zero-shot --score posterior --relabel (no prompt needed;
#     evidence weights fitted), tune coop+gce on the relabelled rows; and the same without
#     --relabel (suspects dropped)
#   oracle: coop+gce on only the correctly labelled rows (what perfect cleaning could give)
#   transductive: pseudolabel --method transductive --labels (every training image labelled by the
#     mixture model, the given labels naming its clusters), then a linear probe on those labels
#   with VERIFIED=K: the same with K of the given labels checked (pseudolabel --trusted; simulated:
#     K random rows of the labels file, numpy seed 1000 + seed, with their clean_label), and coop+gce
#     on the labels file with those K rows corrected (the baseline given the same checks)
# and evaluate each on the test features. Results: $SWEEP/high-noise/results/*.json
# (`promptcli report $SWEEP/high-noise/results` tabulates them).
#
#     OUT=noise-sweep examples/noise_sweep.sh && SWEEP=noise-sweep benchmarks/high_noise.sh
set -euo pipefail

SWEEP=${SWEEP:-noise-sweep}
RATES=${RATES:-0.5 0.75}
SEEDS=${SEEDS:-1 2 3}
EPOCHS=${EPOCHS:-50}
DEVICE=${DEVICE:-auto}
VERIFIED=${VERIFIED:-}
WAIT_MINUTES=${WAIT_MINUTES:-60}
OUT=$SWEEP/high-noise
if [[ ! -d "$SWEEP/features" ]]; then
    echo "Error: $SWEEP/features: no noise sweep here — run examples/noise_sweep.sh with OUT=$SWEEP first (or set SWEEP)" >&2
    exit 2
fi
mkdir -p "$OUT/labels" "$OUT/prompts" "$OUT/results"
train=$SWEEP/features/train.h5
test=$SWEEP/features/test.h5

todo() { [[ ! -e "$1" ]]; }
await() { # await FILE WHAT: a file the sweep (maybe still running) makes; give up after WAIT_MINUTES
    local waited=0
    while [[ ! -e "$1" ]]; do
        if ((waited == 0)); then echo "waiting for $1 ($2)" >&2; fi
        if ((waited >= WAIT_MINUTES * 60)); then
            echo "Error: $1 did not appear in $WAIT_MINUTES min — $2 (WAIT_MINUTES sets the wait)" >&2
            exit 2
        fi
        sleep 20
        waited=$((waited + 20))
    done
}
tune() { # tune OUTPUT LABELS ARGS...
    local out=$1 labels=$2
    shift 2
    todo "$OUT/prompts/$out.safetensors" && promptcli tune "$train" "$labels" -o "$OUT/prompts/$out.safetensors" \
        --epochs "$EPOCHS" --device "$DEVICE" --log "$OUT/results/$out.jsonl" --resume -q "$@"
    todo "$OUT/results/$out.json" && promptcli eval "$test" --prompt "$OUT/prompts/$out.safetensors" \
        --device "$DEVICE" -o "$OUT/results/$out.json" -q
    return 0
}

for rate in $RATES; do
    for seed in $SEEDS; do
        name=r${rate}_s${seed}
        labels=$SWEEP/labels/$name.csv
        await "$test" "the sweep's test features, written once its extraction ends"
        # the same command as the sweep's, so the same file (the sweep then skips it)
        todo "$labels.json" && promptcli corrupt "$train" --shots 16 --rate "$rate" --type symmetric \
            --seed "$seed" -o "$labels" --force -q
        # oracle: the rows whose label is correct (is_noisy == 0), all other columns kept
        oracle=$OUT/labels/oracle_$name.csv
        todo "$oracle" && python - "$labels" "$oracle" <<'PY'
import csv, sys
with open(sys.argv[1], newline="") as f:
    rows = list(csv.DictReader(f))
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(r for r in rows if r["is_noisy"] in ("0", "false", "False"))
PY
        tune "oracle_coop_gce_$name" "$oracle" --loss gce --seed "$seed"
        tune "ot_coop_gce_$name" "$labels" --loss gce --split ot --seed "$seed"
        tune "ot_coop_ce_$name" "$labels" --loss ce --split ot --seed "$seed"
        fixed=$OUT/labels/fixed_$name.csv
        todo "$fixed" && promptcli clean "$train" "$labels" --zero-shot --score posterior --relabel \
            -o "$OUT/labels/posterior_scores_$name.csv" --clean-out "$fixed" --json -q \
            >"$OUT/results/posterior_$name.summary.json"
        tune "posterior_coop_gce_$name" "$fixed" --loss gce --seed "$seed"
        dropped=$OUT/labels/posterior_kept_$name.csv
        todo "$dropped" && promptcli clean "$train" "$labels" --zero-shot --score posterior \
            --clean-out "$dropped" --json -q >"$OUT/results/posterior_drop_$name.summary.json"
        tune "posterior_drop_coop_gce_$name" "$dropped" --loss gce --seed "$seed"
        named=$OUT/labels/transductive_$name.csv
        todo "$named" && promptcli pseudolabel "$train" --method transductive --labels "$labels" -o "$named" -q
        tune "transductive_linear_probe_$name" "$named" --method linear-probe --seed "$seed"
        if [[ -n "$VERIFIED" ]]; then
            checked=$OUT/labels/verified${VERIFIED}_$name.csv
            todo "$checked" && python - "$labels" "$checked" "$VERIFIED" "$seed" <<'PY'
import csv, sys
import numpy as np
src, dst, k, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(src, newline="") as f:
    rows = list(csv.DictReader(f))
pick = sorted(np.random.default_rng(1000 + seed).permutation(len(rows))[:k])
with open(dst, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label"])
    w.writerows([rows[i]["path"], rows[i]["clean_label"]] for i in pick)
PY
            named=$OUT/labels/transductive_verified${VERIFIED}_$name.csv
            todo "$named" && promptcli pseudolabel "$train" --method transductive --labels "$labels" \
                --trusted "$checked" -o "$named" -q
            tune "transductive_verified${VERIFIED}_linear_probe_$name" "$named" --method linear-probe --seed "$seed"
            # the baseline given the same checks: the labels file with the checked rows corrected, coop+gce on it
            corrected=$OUT/labels/corrected${VERIFIED}_$name.csv
            todo "$corrected" && python - "$labels" "$checked" "$corrected" <<'PY'
import csv, sys
src, checked, dst = sys.argv[1:]
with open(checked, newline="") as f:
    fixed = {r["path"]: r["label"] for r in csv.DictReader(f)}
with open(src, newline="") as f:
    rows = list(csv.DictReader(f))
with open(dst, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label"])
    w.writerows([r["path"], fixed.get(r["path"], r["label"])] for r in rows)
PY
            tune "verified${VERIFIED}_coop_gce_$name" "$corrected" --loss gce --seed "$seed"
        fi
    done
done

# clean-and-retune needs the sweep's coop+gce prompts: last, so the rest never waits for the sweep
for rate in $RATES; do
    for seed in $SEEDS; do
        name=r${rate}_s${seed}
        labels=$SWEEP/labels/$name.csv
        gce=$SWEEP/prompts/coop_gce_$name.safetensors
        await "$gce" "the sweep's coop+gce prompt: is the sweep still training, and does it run coop+gce at rate $rate, seed $seed?"
        kept=$OUT/labels/kept_$name.csv
        todo "$kept" && promptcli clean "$train" "$labels" --prompt "$gce" -o "$OUT/labels/scores_$name.csv" \
            --clean-out "$kept" --json -q >"$OUT/results/clean_$name.summary.json"
        tune "retuned_coop_gce_$name" "$kept" --loss gce --seed "$seed"
        fixed=$OUT/labels/fixed_prompt_$name.csv
        todo "$fixed" && promptcli clean "$train" "$labels" --prompt "$gce" --score posterior --relabel \
            -o "$OUT/labels/posterior_prompt_scores_$name.csv" --clean-out "$fixed" --json -q \
            >"$OUT/results/posterior_prompt_$name.summary.json"
        tune "posterior_prompt_coop_gce_$name" "$fixed" --loss gce --seed "$seed"
    done
done
