#!/usr/bin/env bash
# The GPU check: the recipe's sizes on one GPU, in about 15 minutes on an H200, as one table.
#
#   bash benchmarks/gpu_check.sh [--output_dir DIR] [--model_dir DIR] [--only sd15,sdxl,train] [--dry_run]
#
# 1. SD1.5 architecture, 512 px, batch 4, T 50, K 5, fp16, all three modules: s/iteration, peak GPU memory,
#    overhead ratio, and the reference style (the authors' costly choices) side by side.
# 2. SDXL architecture, fp16, all three modules: 1024 px batch 1, and 512 px batch 6 (the paper's SDXL setting).
# 3. A 20-step fp16 training run of train_comat.py with gradient accumulation 2 on the SD1.5 architecture
#    (two processes when the machine has two GPUs), which must end with a finite LoRA identical on every process.
# Models are random weights of the published architectures (benchmarks/bench_iteration.py builds them once into
# --model_dir). Results: DIR/*.json and DIR/table.md; the table is also printed.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash benchmarks/gpu_check.sh [--output_dir DIR] [--model_dir DIR] [--only sd15,sdxl,train] [--dry_run]"; }
output_dir=gpu-check
model_dir=${TMPDIR:-/tmp}/comat-bench-models
only=sd15,sdxl,train
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --output_dir) [ $# -ge 2 ] || { usage >&2; exit 2; }; output_dir=$2; shift 2 ;;
    --model_dir) [ $# -ge 2 ] || { usage >&2; exit 2; }; model_dir=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || { usage >&2; exit 2; }; only=$2; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
for part in ${only//,/ }; do
  case "$part" in
    sd15|sdxl|train) ;;
    *) echo "gpu_check.sh: --only takes sd15, sdxl and train (comma-separated), not '$part'" >&2; exit 2 ;;
  esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }

python=${PYTHON:-python}
num_gpus=0
if [ "$dry_run" = 0 ]; then
  num_gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
  if [ "$num_gpus" -lt 1 ]; then
    echo "gpu_check.sh: no CUDA device is visible to torch; this check needs a GPU (use --dry_run to see the commands)." >&2
    exit 2
  fi
fi

bench=(benchmarks/bench_iteration.py --device cuda --mixed_precision fp16 --model_dir "$model_dir" --iterations 2 --warmup 1)
commands=()
wants sd15 && commands+=("$python ${bench[*]} --arch sd15 --resolution 512 --batch_size 4 --num_inference_steps 50 --num_grad_steps 5 --reference_style --output $output_dir/sd15_512_b4.json")
wants sdxl && commands+=("$python ${bench[*]} --arch sdxl --resolution 1024 --batch_size 1 --num_inference_steps 50 --num_grad_steps 5 --no_isolated_phases --output $output_dir/sdxl_1024_b1.json")
wants sdxl && commands+=("$python ${bench[*]} --arch sdxl --resolution 512 --batch_size 6 --num_inference_steps 50 --num_grad_steps 5 --no_isolated_phases --output $output_dir/sdxl_512_b6.json")
if wants train; then
  launcher="$python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision fp16 --dynamo_backend no"
  [ "$num_gpus" -ge 2 ] && launcher="$python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision fp16 --dynamo_backend no"
  # Random GroundingDINO boxes are meaningless (see bench_iteration.py): no box passes 1.01, the masks are empty.
  commands+=("$python -c 'import sys; sys.path.insert(0, \"benchmarks\"); import bench_iteration; bench_iteration.prepare_models(\"sd15\", \"$model_dir\", 0)'")
  commands+=("$launcher train_comat.py --pretrained_model_name_or_path $model_dir/sd15/base --caption_model_name_or_path $model_dir/sd15/blip --grounding_model_name_or_path $model_dir/sd15/grounding_dino --sam_model_name_or_path $model_dir/sd15/sam --box_threshold 1.01 --output_dir $output_dir/train_fp16_ga2 --mixed_precision fp16 --gradient_checkpointing --gradient_accumulation_steps 2 --train_batch_size 2 --num_inference_steps 10 --num_grad_steps 2 --max_train_steps 20 --checkpointing_steps 10 --report_to none --overwrite_output_dir")
  commands+=("$python benchmarks/gpu_check_table.py --check_lora $output_dir/train_fp16_ga2")
fi
commands+=("$python benchmarks/gpu_check_table.py --output_dir $output_dir")

if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi
mkdir -p "$output_dir"
for command in "${commands[@]}"; do
  echo "+ $command"
  start=$(date +%s)
  eval "$command" 2>&1 | tee -a "$output_dir/log.txt" || { echo "gpu_check.sh: failed: $command" >&2; exit 1; }
  echo "$command" | grep -q "train_comat.py" && echo "{\"seconds\": $(( $(date +%s) - start ))}" > "$output_dir/train_fp16_ga2.json"
done
