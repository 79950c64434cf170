#!/usr/bin/env bash
# A complete CoMat training run offline on CPU in a few minutes: tiny models built by the project,
# the built-in prompts, all three modules; then the LoRA is loaded back into a stock diffusers pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
# A missing or half-finished installation (no completion marker) is (re)done first.
[ -f .venv/.comat-install-complete ] || bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

python -m utils.tiny_models --output_dir tiny-models
rm -rf comat-demo
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_comat.py \
  --pretrained_model_name_or_path tiny-models/sd \
  --caption_model_name_or_path tiny-models/blip \
  --grounding_model_name_or_path tiny-models/grounding_dino --sam_model_name_or_path tiny-models/sam \
  --attention_layers mid,up --box_threshold 0.05 --text_threshold 0.05 \
  --resolution 64 --train_batch_size 2 --num_inference_steps 8 --num_grad_steps 2 \
  --max_train_steps 20 --checkpointing_steps 10 --rank 4 --learning_rate 1e-3 \
  --validation_prompt "a red book and a yellow vase" --num_validation_images 2 --validation_steps 10 \
  --eval_prompts builtin:color --eval_steps 10 --eval_num_prompts 4 --blip_vqa_model tiny-models/blip_vqa \
  --output_dir comat-demo

# The alignment curve the run logged to TensorBoard (tensorboard --logdir comat-demo/logs shows it too).
python - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator("comat-demo/logs/comat")
events.Reload()
curve = ", ".join(f"step {e.step}: {e.value:.4f}" for e in events.Scalars("alignment/color/blip_vqa"))
print(f"alignment/color/blip_vqa during training: {curve}")
PY

python - <<'PY'
import utils  # noqa: F401  (hides two expected, harmless library warnings; see the README's Troubleshooting)
import numpy as np
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("tiny-models/sd", safety_checker=None)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(num_inference_steps=10, height=64, width=64, output_type="np")
base = pipe("a red book and a yellow vase", generator=torch.Generator().manual_seed(0), **kwargs).images
pipe.load_lora_weights("comat-demo")
comat = pipe("a red book and a yellow vase", generator=torch.Generator().manual_seed(0), **kwargs).images
print(f"Loaded comat-demo/pytorch_lora_weights.safetensors into a stock StableDiffusionPipeline; "
      f"mean |CoMat - base| pixel difference: {np.abs(comat - base).mean():.4f}")
PY

# Did the LoRA improve alignment? Base vs LoRA on unseen built-in prompts, same seeds (tiny random scorers here).
python pipeline_comat.py evaluate --base_model tiny-models/sd --lora comat-demo \
  --prompts builtin:color,spatial,non_spatial --max_prompts 4 --images_per_prompt 2 \
  --num_inference_steps 10 --resolution 64 --blip_vqa_model tiny-models/blip_vqa \
  --grounding_model tiny-models/grounding_dino --clip_model tiny-models/clip --box_threshold 0.05 --text_threshold 0.05 \
  --output_dir comat-demo/eval

# The paper's diagnostic: how much cross-attention each prompt token gets, base vs CoMat LoRA.
python pipeline_comat.py activations --base_model tiny-models/sd --lora comat-demo \
  --prompt "a red book and a yellow vase" --num_inference_steps 10 --resolution 64 \
  --output comat-demo/token_activations.png
