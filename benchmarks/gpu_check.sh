#!/usr/bin/env bash
# GPU paths of fine-tuning and extraction, in a few minutes on one or two GPUs of compute capability 8.0+
# (Ampere or newer: steps 1 and 4 run bf16; not runnable on CPU):
#   1. an AMP fine-tuning run (bf16 autocast, then fp16 with loss scaling), 2 epochs, with --wise-alpha;
#   2. fp16 extraction through the fine-tuned tower (--adapter) and eval on it;
#   3. with 2+ GPUs: torchrun with 2 processes (NCCL) against 1 process, same global batch;
#   4. vpt (fp16) and maple (bf16) on a ViT-B-16 tower with random weights (no download), 1 epoch each,
#      then extraction through the prompted tower (--adapter) and eval.
#   5. pseudolabel --method transductive, with --labels (spreading) and without (the neighbour term), on CUDA
#      against CPU (same labels on >= 99% of images).
# Uses the offline demo model: extracts its 2,000 training images and tunes on a 160-row 16-shot set. Every
# step must exit 0; the script stops at
# the first failure (set -e) and prints PASS at the end.
#
#     bash benchmarks/gpu_check.sh            # OUT=gpu-check by default
set -euo pipefail

OUT=${OUT:-gpu-check}
PROMPTCLI=${PROMPTCLI:-promptcli}
read -r -a cli <<<"$PROMPTCLI"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible")'
n_gpu=$(python -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$OUT"
start=$SECONDS

"${cli[@]}" demo-images "$OUT/images" -q
"${cli[@]}" extract "$OUT/images/train" -o "$OUT/train.h5" --model promptcli-demo --device cuda \
    --dtype float32 --force -q
"${cli[@]}" corrupt "$OUT/train.h5" --shots 16 --rate 0.5 --seed 1 -o "$OUT/noisy.csv" --force -q
ft=(tune "$OUT/train.h5" "$OUT/noisy.csv" --method finetune --epochs 2 -b 32 --workers 4 --device cuda
    --optimizer adamw --lr 1e-5 --seed 1 --force -q)

echo "1. AMP fine-tuning (bf16, fp16 with loss scaling)"
"${cli[@]}" "${ft[@]}" -o "$OUT/ft-bf16.safetensors" --precision bf16 --wise-alpha 0.5 --log "$OUT/bf16.jsonl"
"${cli[@]}" "${ft[@]}" -o "$OUT/ft-fp16.safetensors" --precision fp16
python - "$OUT" <<'PY'
import json, sys, torch
from promptcli.io.prompt_files import read_prompt
out = sys.argv[1]
for name in ("ft-bf16", "ft-fp16", "ft-bf16.wise0.5"):
    p = read_prompt(f"{out}/{name}.safetensors")
    assert all(torch.isfinite(t).all() for t in p.tensors.values()), name
    assert p.metadata["finetune"]["tensors"], name
rows = [json.loads(line) for line in open(f"{out}/bf16.jsonl")]
assert [r["epoch"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
print("   finite tensors, log ok; precision", read_prompt(f"{out}/ft-fp16.safetensors").metadata["finetune"]["precision"])
PY

echo "2. fp16 extraction through the tuned tower, eval"
"${cli[@]}" extract "$OUT/images/test" -o "$OUT/test-ft.h5" --model promptcli-demo --device cuda \
    --precision fp16 --adapter "$OUT/ft-bf16.safetensors" --force -q
"${cli[@]}" eval "$OUT/test-ft.h5" --prompt "$OUT/ft-bf16.safetensors" -o "$OUT/ft-metrics.json" --force -q
python -c "import json; m = json.load(open('$OUT/ft-metrics.json'))['metrics']; print('   test top-1', m['top1'])"

if ((n_gpu >= 2)); then
    echo "3. torchrun 2 GPUs (NCCL) vs 1 GPU, same global batch"
    one=(tune "$OUT/train.h5" "$OUT/noisy.csv" --method finetune --epochs 1 -b 32 --workers 2 --device cuda
         --optimizer sgd --lr 0.002 --seed 1 --precision bf16 --force -q)
    "${cli[@]}" "${one[@]}" -o "$OUT/one.safetensors"
    PROMPTCLI_DIST_TIMEOUT=300 torchrun --standalone --nproc-per-node 2 -m promptcli "${one[@]}" -o "$OUT/two.safetensors"
    python - "$OUT" <<'PY'
import sys, torch
from promptcli.io.prompt_files import read_prompt
a = read_prompt(f"{sys.argv[1]}/one.safetensors").tensors
b = read_prompt(f"{sys.argv[1]}/two.safetensors").tensors
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
scale = max(float(a[k].abs().max()) for k in a)
print(f"   max |1 GPU - 2 GPUs| = {diff:.3g} (largest tensor value {scale:.3g})")
assert diff <= 1e-2 * scale, "DDP result differs from one process beyond bf16 rounding"
PY
else
    echo "3. skipped: $n_gpu GPU visible (DDP needs 2)"
fi
echo "4. image prompts on a ViT tower (random ViT-B-16 weights): maple bf16, vpt fp16, extract --adapter, eval"
vit=(--model ViT-B-16 --random-weights --seed 1 --device cuda)
"${cli[@]}" extract "$OUT/images/train" -o "$OUT/vit-train.h5" "${vit[@]}" --dtype float32 --force -q
"${cli[@]}" corrupt "$OUT/vit-train.h5" --shots 16 --rate 0.5 --seed 1 -o "$OUT/vit-noisy.csv" --force -q
for method in maple vpt; do
    precision=bf16
    if [[ $method == vpt ]]; then precision=fp16; fi
    "${cli[@]}" tune "$OUT/vit-train.h5" "$OUT/vit-noisy.csv" -o "$OUT/$method.safetensors" --method "$method" \
        --epochs 1 -b 32 --workers 4 --device cuda --precision "$precision" --seed 1 --force -q
    "${cli[@]}" extract "$OUT/images/test" -o "$OUT/vit-test-$method.h5" "${vit[@]}" --precision fp16 \
        --adapter "$OUT/$method.safetensors" --force -q
    "${cli[@]}" eval "$OUT/vit-test-$method.h5" --prompt "$OUT/$method.safetensors" -o "$OUT/$method.json" --force -q
    python -c "import json; m = json.load(open('$OUT/$method.json'))['metrics']; print('   $method ($precision) test top-1', m['top1'])"
done
echo "5. transductive pseudo-labels with and without noisy labels (k-NN graph, sparse products) on CUDA against CPU"
for device in cuda cpu; do
    "${cli[@]}" pseudolabel "$OUT/train.h5" --method transductive --labels "$OUT/noisy.csv" --device "$device" \
        -o "$OUT/transductive-$device.csv" --force -q
    "${cli[@]}" pseudolabel "$OUT/train.h5" --method transductive --device "$device" \
        -o "$OUT/unsupervised-$device.csv" --force -q
done
python - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
for kind in ("transductive", "unsupervised"):
    rows = {d: list(csv.DictReader(open(f"{out}/{kind}-{d}.csv"))) for d in ("cuda", "cpu")}
    same = sum(a["label"] == b["label"] for a, b in zip(rows["cuda"], rows["cpu"])) / len(rows["cpu"])
    fits = {d: json.load(open(f"{out}/{kind}-{d}.csv.json"))["transductive"] for d in ("cuda", "cpu")}
    rates = {d: fits[d]["noise_rate"] for d in fits}
    print(f"   {kind}: labels equal on {same:.4f} of {len(rows['cpu'])} images; estimated noise rate {rates}")
    assert same >= 0.99 and fits["cuda"]["renamed_clusters"] == fits["cpu"]["renamed_clusters"]
    if kind == "transductive":
        assert abs(rates["cuda"] - rates["cpu"]) < 1e-3
    else:
        assert fits["cpu"]["neighbour_scale"] > 0 and rates["cpu"] is None
PY
echo "PASS in $((SECONDS - start)) s"
