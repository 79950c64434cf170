"""Model cards and Hugging Face Hub uploads for CoMat LoRA folders.

The token is resolved by ``huggingface_hub`` itself (argument, ``HF_TOKEN``, or a saved login) and is
only ever passed to its API calls: it is never written to a file, a log line or a tracker config.
"""

import logging
import os

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Resume state is useful locally but is not part of a published LoRA.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "*.partial", "*.stale", "logs/*", "reference_latents/*"]
SECRET_ARG_NAMES = ("hub_token",)


def public_training_settings(args):
    """The run's flags as a JSON-able dict, without secrets (for model cards and tracker configs)."""
    settings = {}
    for key, value in sorted(vars(args).items()):
        if key in SECRET_ARG_NAMES:
            continue
        settings[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return settings


def save_model_card(
    output_dir,
    base_model,
    pipeline_class_name,
    training_settings,
    validation_prompt=None,
    image_paths=(),
    repo_id=None,
    extra_tags=(),
):
    """Write ``output_dir/README.md``: metadata (base model, tags), how to load, settings, sample images."""
    tags = ["text-to-image", "diffusers", "lora", "comat", "diffusers-training", *extra_tags]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="openrail++" if "xl" in pipeline_class_name.lower() else "creativeml-openrail-m",
        tags=tags,
        instance_prompt=None,
        widget=[{"text": validation_prompt or "", "output": {"url": os.path.basename(p)}} for p in image_paths],
    )
    lora_id = repo_id or output_dir
    settings_lines = "\n".join(f"| `{k}` | `{v}` |" for k, v in training_settings.items())
    images = "\n".join(f"![sample]({os.path.relpath(p, output_dir)})" for p in image_paths)
    content = f"""---
{card_data.to_yaml()}
---

# CoMat LoRA for {base_model}

LoRA weights for [{base_model}](https://huggingface.co/{base_model}) fine-tuned with
[CoMat](https://arxiv.org/abs/2404.03653) (image-to-text concept matching: a frozen captioner,
attribute concentration and fidelity preservation), so that images follow their prompts — every
object present, every attribute on the right object.

## How to use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{lora_id}")
image = pipe("{(validation_prompt or "a red book and a yellow vase").replace('"', "'")}").images[0]
```

## Samples

{images or "No validation images were generated for this run."}
{f"Prompt: `{validation_prompt}`" if image_paths and validation_prompt else ""}

## Training settings

| flag | value |
|---|---|
{settings_lines}
"""
    ModelCard(content).save(os.path.join(output_dir, "README.md"))


def push_folder_to_hub(folder, repo_id, token=None, private=False, commit_message="Upload CoMat LoRA"):
    """Create (if needed) the model repo and upload ``folder`` without resume-only files; returns the repo id."""
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"{folder} has no {LORA_WEIGHTS_NAME}: push a folder written by train_comat.py / train_comat_sdxl.py."
        )
    repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    logger.info(f"Uploaded {folder} to https://huggingface.co/{repo_id}")
    return repo_id
