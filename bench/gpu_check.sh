#!/usr/bin/env bash
# Every GPU measurement of the input-pipeline / throughput work in one go, each part under
# its own `timeout`, with whatever python3 and torch the machine has; prints one summary
# at the end and leaves two files in OUT_DIR: gpu_check.log (everything printed) and
# gpu_check.json (each part's JSON record).
#
#   bash bench/gpu_check.sh                       # all parts, on the GPU (about 8 minutes; see README)
#   bash bench/gpu_check.sh throughput endtoend   # some parts
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --small   # the same script on a CPU, tiny sizes
#
# Parts: ops splitbn throughput endtoend dataloader endtoend_simclr compile endtoend_compile ceiling endtoend_decode
#        recipes small_data families moco_v3
#   ops              tests/test_gpu_augment.py on the GPU (each batched op vs torchvision, within 1/255) and
#                    tests/test_gpu_decode.py (nvJPEG decode + crops vs the PIL worker path), and the
#                    --in-channels 1 and 5 batched ops vs the loader path (tests/test_channels.py)
#   splitbn          one BN layer: SplitBatchNorm NCHW / NHWC reshape (reference) / NHWC grouped (ours) / plain BN
#   throughput       MoCo v2 and SimCLR R50 224 px batch 256 step rate: reference-style loop vs every flag
#   endtoend         main_moco.py on 4,096 JPEGs (500x375) with -j 15, next to the step rate of the same flags
#   dataloader       loader images/s with 15 workers: MoCo authors' loader, our CPU path, --gpu-augment's half
#   endtoend_simclr  main_simclr.py end to end, as endtoend
#   compile          --compile (and the fused SGD kernel): warm-up (compile) time and step rate, MoCo and
#                    SimCLR R50 224 px; MoCo resnet18 32 px batch 512
#   endtoend_compile main_moco.py and main_simclr.py end to end with --compile --gpu-augment --amp --channels-last
#   ceiling          MoCo without SplitBatchNorm (--bn-splits 1): the step rate the BN groups cost
#   endtoend_decode  as endtoend_compile with --gpu-decode (JPEG decode, crop and flip on the GPU; the step rate
#                    includes them)
#   recipes          bench/recipes.py: the GPU minutes of `--recipe small` for 1k/5k/20k images at 32-128 px
#   small_data       bench/quality.py at 25 and 100 epochs on a 2,000-image Fashion-MNIST pool, 2 seeds (issue 17's
#                    GPU target). Needs FMNIST=<folder with FashionMNIST/raw/> (../shared does not travel: copy
#                    e.g. bench.util.mnist_subset's 2k/2k + pool subsets into an ignored folder and carry it)
#   families         bench/throughput.py --families: MoCo v2 and SimCLR step rate and parameters per backbone
#                    family (ResNet, RegNet, MobileNet, EfficientNet, DenseNet, ConvNeXt, Swin, ViT) at 224 px
#   moco_v3          main_moco_v3.py end to end on generated images, ResNet-50 (LARS) and ViT-B/16 (AdamW,
#                    --stop-grad-conv1), --amp --channels-last --gpu-augment: the second epoch's images/s
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu_check}
SMALL=0
PARTS=()
for a in "$@"; do
  case "$a" in
    --small) SMALL=1 ;;
    *) PARTS+=("$a") ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(ops splitbn throughput endtoend dataloader endtoend_simclr compile ceiling)
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"

if [ "$SMALL" = 1 ]; then  # CPU dry run: every part, tiny sizes
  DEV=cpu; ARCH=resnet18; CROP=64; B=16; K=64; SPLITS=2; J=2; N=64; IMG="120 90"; STEPS=2; REP=1; WARM=1
  SHAPE="16 32 16 16"; T=4; CIFAR_B=16
  RECIPE_SIZE=(--crop-sizes 32 --measure-images 64 --measure-epochs 1); QUALITY_SIZE=(--pretrain-images 200
    --train-images 200 --test-images 100 --sup-epochs 1 --seeds 0 --fractions 1 0.1); EPOCHS_GRID=(1 2)
  FAMILIES=(--crop-size 32 -b 8 --families resnet18 mobilenet_v3_small vit_tiny)
  V3_ARCHS=(resnet18 vit_tiny); V3_SIZE=(--crop-size 32 -b 16 --synthetic-size 64 --no-small-images)
else
  DEV=cuda; ARCH=resnet50; CROP=224; B=256; K=65536; SPLITS=8; J=15; N=4096; IMG="500 375"; STEPS=6; REP=2; WARM=2
  SHAPE="256 256 56 56"; T=1; CIFAR_B=512
  RECIPE_SIZE=(--measure-images 4096); QUALITY_SIZE=(--pretrain-images 2000 --seeds 0 1 --workers 8)
  EPOCHS_GRID=(25 100)
  FAMILIES=(--crop-size 224 -b 64 --configs amp+channels_last --families)
  V3_ARCHS=(resnet50 vit_b_16); V3_SIZE=(--crop-size 224 -b 256 --synthetic-size 8192 --synthetic-image-size 256
    --amp --channels-last --gpu-augment)
fi
COMMON=(-a "$ARCH" --crop-size "$CROP" -b "$B" --moco-k "$K" --bn-splits "$SPLITS" --device "$DEV")

part() {  # part NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$(( $2 * T )); shift 2
  echo "===== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "===== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

both_methods() {  # both_methods NAME CONFIG: main_moco.py and main_simclr.py end to end with one configuration
  local m
  for m in moco simclr; do
    part "${1}_$m" 240 $PY bench/endtoend.py --method $m "${COMMON[@]}" -j "$J" --num-images "$N" \
      --image-size $IMG --data-dir "$WORK/jpegs" --step-repeats "$REP" --step-steps "$STEPS" \
      --configs "$2" --json "$WORK/${1}_$m.json"
  done
}

{
  echo "===== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  nproc
  $PY -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'PIL', PIL.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

for p in "${PARTS[@]}"; do
  case "$p" in
    ops)
      # (the script-level resume test is CPU-only: cudnn autotuning is not bitwise repeatable)
      part ops 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu_augment.py tests/test_gpu_decode.py \
        tests/test_channels.py -k "not main_moco and (not test_channels or batched_full_depth)" ;;
    splitbn)
      part splitbn 60 $PY bench/split_bn.py --device "$DEV" --shape $SHAPE --repeats 10 --json "$WORK/splitbn.json" ;;
    throughput)
      part throughput 200 $PY bench/throughput.py --methods moco simclr "${COMMON[@]}" --steps "$STEPS" --warmup "$WARM" \
        --repeats "$REP" --configs baseline default amp channels_last amp+channels_last gpu_augment \
        amp+channels_last+gpu_augment --json "$WORK/throughput.json" ;;
    endtoend)
      part endtoend 240 $PY bench/endtoend.py --method moco "${COMMON[@]}" -j "$J" --num-images "$N" --image-size $IMG \
        --data-dir "$WORK/jpegs" --step-repeats "$REP" --step-steps "$STEPS" \
        --configs default amp+channels_last amp+channels_last+gpu_augment --json "$WORK/endtoend.json" ;;
    dataloader)
      part dataloader 120 $PY bench/dataloader.py --source jpeg --image-size $IMG --crop-size "$CROP" \
        --num-images $(( N < 512 ? N : 512 )) -b 64 --workers "$J" --repeats 2 --recipes mocov2 \
        --paths reference pil gpu_split gpu_decode torchvision_blur --json "$WORK/dataloader.json" ;;
    endtoend_simclr)
      part endtoend_simclr 200 $PY bench/endtoend.py --method simclr "${COMMON[@]}" -j "$J" --num-images "$N" \
        --image-size $IMG --data-dir "$WORK/jpegs" --step-repeats "$REP" --step-steps "$STEPS" \
        --configs amp+channels_last amp+channels_last+gpu_augment --json "$WORK/endtoend_simclr.json" ;;
    compile)
      part compile 330 $PY bench/throughput.py --methods moco simclr "${COMMON[@]}" --steps "$STEPS" \
        --warmup "$WARM" --repeats 2 --configs baseline amp+channels_last amp+channels_last+fused_optim \
        amp+channels_last+compile --json "$WORK/compile.json"
      part compile_cifar 120 $PY bench/throughput.py --methods moco -a resnet18 --crop-size 32 -b "$CIFAR_B" \
        --moco-k 4096 --bn-splits "$SPLITS" --device "$DEV" --steps "$STEPS" --warmup "$WARM" --repeats 2 \
        --configs amp+channels_last amp+channels_last+compile --json "$WORK/compile_cifar.json" ;;
    endtoend_compile)
      both_methods endtoend_compile amp+channels_last+gpu_augment+compile ;;
    ceiling)
      part ceiling 90 $PY bench/throughput.py --methods moco -a "$ARCH" --crop-size "$CROP" -b "$B" --moco-k "$K" \
        --bn-splits 1 --device "$DEV" --steps "$STEPS" --warmup "$WARM" --repeats "$REP" \
        --configs default amp+channels_last --json "$WORK/ceiling.json" ;;
    endtoend_decode)
      both_methods endtoend_decode amp+channels_last+gpu_decode+compile ;;
    recipes)
      part recipes 240 $PY bench/recipes.py --device "$DEV" -j "$J" "${RECIPE_SIZE[@]}" --data-dir "$WORK/recipes" \
        --output-dir "$WORK/recipes_runs" --json "$WORK/recipes.json" ;;
    small_data)
      for e in "${EPOCHS_GRID[@]}"; do
        part "small_data_${e}ep" 300 $PY bench/quality.py "${FMNIST:-../shared/data/fashion-mnist}" --quick \
          --device "$DEV" "${QUALITY_SIZE[@]}" --pretrain-epochs "$e" --output-dir "$WORK/small_data_$e" \
          --json "$WORK/small_data_${e}ep.json"
      done ;;
    families)
      part families 300 $PY bench/throughput.py --device "$DEV" "${FAMILIES[@]}" --steps "$STEPS" --warmup "$WARM" \
        --repeats "$REP" --json "$WORK/families.json" ;;
    moco_v3)
      for a in "${V3_ARCHS[@]}"; do
        extra=(); [[ $a == vit* ]] && extra=(--optimizer adamw --lr 1.5e-4 --wd 0.1 --stop-grad-conv1)
        part "moco_v3_$a" 240 $PY main_moco_v3.py --dataset synthetic -a "$a" "${V3_SIZE[@]}" "${extra[@]}" -j "$J" \
          --epochs 2 --warmup-epochs 0 -p 10 --output-dir "$WORK/moco_v3_$a"
      done
      $PY - "$WORK" "${V3_ARCHS[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
import torch
from bench.util import format_table
work, archs = sys.argv[1], sys.argv[2:]
rows = []
for a in archs:
    path = os.path.join(work, f"moco_v3_{a}", "metrics.jsonl")
    lines = [json.loads(x) for x in open(path)] if os.path.isfile(path) else []
    rows.append([a, f"{lines[-1]['images_per_sec']:.0f}" if lines else "failed"])
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
table = format_table(["arch", "images/s (2nd epoch, end to end)"], rows)
print(table)
json.dump({"title": "MoCo v3 end to end", "machine": {"gpu" if torch.cuda.is_available() else "cpu": device,
           "torch": torch.__version__}, "table": table}, open(os.path.join(work, "moco_v3.json"), "w"))
EOF
      ;;
    *) echo "unknown part $p (parts: ops splitbn throughput endtoend dataloader endtoend_simclr compile endtoend_compile ceiling endtoend_decode recipes small_data families moco_v3)" \
         | tee -a "$LOG"; exit 2 ;;
  esac
done

# one summary: every part's table, and all records in one JSON
$PY - "$WORK" "$OUT_DIR/gpu_check.json" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
records = {}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    with open(path) as f:
        records[os.path.basename(path)[:-5]] = json.load(f)
print("\n==================== summary ====================")
for name, rec in records.items():
    for key in ("gpu", "cpu"):
        if key in rec.get("machine", {}):
            machine = rec["machine"][key]
            break
    print(f"\n## {name} ({rec.get('title', '')}; {machine}, torch {rec.get('machine', {}).get('torch')})")
    print(rec.get("table", ""))
with open(out, "w") as f:
    json.dump(records, f, indent=1)
print(f"\n=> {out}")
EOF
rm -rf "$WORK"
