#!/usr/bin/env bash
# The standard label-noise protocol in one script: extract features once; for every noise rate and
# seed build a K-shot symmetric-noise training set (`corrupt --shots`), tune each method + loss on it,
# evaluate on the test features; record gradient statistics; then draw one report.
#
# Runs on the bundled demo (Fashion-MNIST subset, offline promptcli-demo model) by default:
#
#     examples/noise_sweep.sh                                   # -> noise-sweep/report.{html,png,md}
#
# On a real dataset with a GPU, change the data and the model:
#
#     TRAIN_DIR=data/train TEST_DIR=data/test MODEL=ViT-B-32 PRETRAINED=openai examples/noise_sweep.sh
#
# Environment variables (defaults in brackets):
#   OUT         output folder [noise-sweep]
#   TRAIN_DIR   training images, ImageFolder layout [the demo's, written to $OUT/images/train]
#   TEST_DIR    test images [the demo's $OUT/images/test]
#   MODEL       open_clip model name [promptcli-demo]
#   PRETRAINED  pretrained tag or checkpoint file [none: the model's own]
#   MODEL_ARGS  extra model flags for extract, e.g. "--model-config my.json" []
#   DEVICE      auto, cpu, cuda or cuda:N [auto]
#   VIEWS       augmented views per training image (extract --views) [0]
#   RATES       noise rates ["0 0.125 0.25 0.5 0.625 0.75"]
#   SEEDS       seeds (of the noise, the shot sample and training) ["1 2 3"]
#   SHOTS       labelled images per class [16]
#   EPOCHS      training epochs [50]
#   METHODS     method+loss pairs, the report's rows ["coop+ce coop+gce linear-probe+ce"]; add
#               finetune+ce for end-to-end fine-tuning of the image tower (slow on CPU: each run trains
#               on images, and its test features are extracted through the tuned tower with --adapter)
#               The other prompt-learning methods on cached features: kgcoop, clip-adapter, cocoop
#               (its paper's 10 epochs, not EPOCHS: its text pass is per image), tip-adapter
#               (training-free) and tip-adapter-f (its paper's 20 epochs), e.g. METHODS="coop+ce kgcoop+ce cocoop+ce clip-adapter+ce tip-adapter-f+ce"
#               On images, with a ViT image tower (not the demo's): vpt+ce and maple+ce (their
#               papers' 5 epochs; test features extracted through the prompted tower, as for finetune)
#   FINETUNE_ARGS  extra flags for the finetune, vpt and maple rows' tune, e.g. "--workers 4" []
#   TUNE_ARGS   extra flags for tune and gradstats, e.g. "--n-ctx 4" []
#   GRADSTATS   methods whose noisy/clean gradient norms are recorded at every noisy rate, one
#               method+loss pair each ("" turns it off) ["coop+ce linear-probe+ce"]
#   GRADSTATS_SEEDS  the seeds gradient statistics run for [all of SEEDS]; exact per-sample
#               gradients cost about one backward pass per sample, so a coop run takes ~10x a
#               tune (measured on the demo, CPU): "1" keeps the figure and saves most of that time
#   PROMPTCLI   how to run promptcli ["promptcli"]
#
# Work already done is skipped (every output is written atomically, so it exists only when complete);
# interrupted extractions and tunes resume. Results go to $OUT/results/, the report beside it.
set -euo pipefail

OUT=${OUT:-noise-sweep}
TRAIN_DIR=${TRAIN_DIR:-}
TEST_DIR=${TEST_DIR:-}
MODEL=${MODEL:-promptcli-demo}
PRETRAINED=${PRETRAINED:-}
MODEL_ARGS=${MODEL_ARGS:-}
DEVICE=${DEVICE:-auto}
VIEWS=${VIEWS:-0}
RATES=${RATES:-0 0.125 0.25 0.5 0.625 0.75}
SEEDS=${SEEDS:-1 2 3}
SHOTS=${SHOTS:-16}
EPOCHS=${EPOCHS:-50}
METHODS=${METHODS:-coop+ce coop+gce linear-probe+ce}
TUNE_ARGS=${TUNE_ARGS:-}
FINETUNE_ARGS=${FINETUNE_ARGS:-}
GRADSTATS=${GRADSTATS-coop+ce linear-probe+ce}
GRADSTATS_SEEDS=${GRADSTATS_SEEDS:-$SEEDS}
PROMPTCLI=${PROMPTCLI:-promptcli}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
read -r -a finetune_args <<<"$FINETUNE_ARGS"
# shellcheck disable=SC2086  # word lists
check_words SEEDS '^[0-9]+$' "1 2 3" $SEEDS $GRADSTATS_SEEDS
# shellcheck disable=SC2086
check_words RATES '^(0|0?\.[0-9]+)$' "0 0.25 0.5" $RATES

mkdir -p "$OUT/features" "$OUT/labels" "$OUT/prompts" "$OUT/results"

image_features --views "$VIEWS"

for rate in $RATES; do
    for seed in $SEEDS; do
        name=r${rate}_s${seed}
        labels=$OUT/labels/$name.csv
        # corrupt writes the CSV, then its sidecar: both must be there
        if [[ -e "$labels" && -e "$labels.json" ]]; then
            echo "skip: $labels exists"
        else
            echo "run: corrupt -> $labels"
            "${cli[@]}" corrupt "$train_h5" --shots "$SHOTS" --rate "$rate" --type symmetric --seed "$seed" \
                -o "$labels" --force -q
            ran=$((ran + 1))
        fi
        for pair in $METHODS; do
            method=${pair%+*} loss=${pair#*+}
            prompt=$OUT/prompts/${method}_${loss}_$name.safetensors
            extra=() eval_h5=$test_h5
            on_images=0 # methods that train on the images: their test features come through the result
            case "$method" in finetune | vpt | maple) on_images=1 extra=("${finetune_args[@]}") ;; esac
            epochs=(--epochs "$EPOCHS") # these keep their papers' epochs (tip-adapter: training-free)
            case "$method" in cocoop | tip-adapter | tip-adapter-f | vpt | maple) epochs=() ;; esac
            run "$prompt" "${cli[@]}" tune "$train_h5" "$labels" -o "$prompt" --method "$method" --loss "$loss" \
                "${epochs[@]}" --seed "$seed" --device "$DEVICE" "${tune_args[@]}" "${extra[@]}" \
                --log "$OUT/results/${method}_${loss}_$name.jsonl" --resume -q
            if ((on_images)); then # the tuned (or prompted) tower's own test features
                eval_h5=$OUT/features/test_${method}_${loss}_$name.h5
                run "$eval_h5" "${cli[@]}" extract "$TEST_DIR" -o "$eval_h5" --model "$MODEL" "${model_args[@]}" \
                    --adapter "$prompt" --device "$DEVICE" --resume -q
            fi
            result=$OUT/results/${method}_${loss}_$name.json
            run "$result" "${cli[@]}" eval "$eval_h5" --prompt "$prompt" --device "$DEVICE" -o "$result" -q
        done
        if [[ "$rate" != 0 && "$rate" != 0.0 && " $GRADSTATS_SEEDS " == *" $seed "* ]]; then
            for pair in $GRADSTATS; do
                method=${pair%+*} loss=${pair#*+}
                grads=$OUT/results/grads_${method}_${loss}_$name.csv
                run "$grads" "${cli[@]}" gradstats "$train_h5" "$labels" -o "$grads" --method "$method" \
                    --loss "$loss" --epochs "$EPOCHS" --seed "$seed" --device "$DEVICE" "${tune_args[@]}" -q
            done
        fi
    done
done

reports=("$OUT/report.html" "$OUT/report.png" "$OUT/report.md")
if ((ran == 0)) && [[ -e "${reports[0]}" && -e "${reports[1]}" && -e "${reports[2]}" ]]; then
    echo "skip: the report is up to date"
else
    echo "run: report -> ${reports[*]}"
    "${cli[@]}" report "$OUT/results" -o "${reports[0]}" -o "${reports[1]}" -o "${reports[2]}" --force \
        --title "Label noise sweep: $MODEL, $SHOTS shots" -q
fi
echo "done: $OUT/report.html"
