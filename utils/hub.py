"""Model cards and Hugging Face Hub uploads for CoMat LoRA folders.

Both ways of publishing a LoRA go through this module: the training scripts' ``--push_to_hub`` (which
writes the card with :func:`save_model_card` and uploads with :func:`push_folder_to_hub`) and
``python pipeline_comat.py push`` (:func:`push_lora_to_hub`, which re-renders the card for the target repo
and then uploads the same way).

Next to ``README.md``, :func:`save_model_card` writes ``comat_model_card.json``, the card's inputs (base
model, training settings, sample images), so that a later push can render the card again with the repo id in
its loading snippet: a run trained without ``--push_to_hub`` only knew its output folder.

The token is resolved by ``huggingface_hub`` itself (``HF_TOKEN`` or a saved ``hf auth login``); the tools
refuse a token on the command line (:data:`TOKEN_ON_COMMAND_LINE`), where ``ps``, shell history and a launcher's
error message would show it. It is never written to a file, a log line or a tracker config.
"""

import json
import logging
import os
import shutil

from huggingface_hub import HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MODEL_CARD_INPUTS_NAME = "comat_model_card.json"
SAMPLES_DIR_NAME = "samples"
# Resume state is useful locally but is not part of a published LoRA.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "logs/*", "reference_latents/*", ".comat.lock"]
SECRET_ARG_NAMES = ("hub_token", "token")
TOKEN_ON_COMMAND_LINE = (
    "is refused: a token on the command line shows in `ps`, in your shell history and in a launcher's error message. "
    "Log in once with `hf auth login`, or set HF_TOKEN in the environment. If you have already typed the token in a "
    "command, consider revoking it at https://huggingface.co/settings/tokens."
)
DEFAULT_SAMPLE_PROMPT = "a red book and a yellow vase"


def public_training_settings(args):
    """The run's flags as a JSON-able dict, without secrets (for model cards and tracker configs)."""
    settings = {}
    for key, value in sorted(vars(args).items()):
        if key in SECRET_ARG_NAMES:
            continue
        settings[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return settings


def _path_in_folder(path, folder):
    """``path`` relative to ``folder`` with ``/`` separators (the form Hub links and repo paths take)."""
    return os.path.relpath(path, folder).replace(os.sep, "/")


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
    """Write ``output_dir/README.md`` (metadata, how to load, samples, settings) and its inputs as JSON.

    Args:
        output_dir: the LoRA folder; ``image_paths`` must lie inside it (they are linked relatively).
        base_model: Hub id or path of the base pipeline.
        pipeline_class_name: the stock pipeline class of the base (picks the license of the family).
        training_settings: the run's public flags (see :func:`public_training_settings`); may be empty.
        validation_prompt: the prompt of the sample images.
        image_paths: sample images.
        repo_id: the Hub repo the card is published in; the loading snippet uses it (else ``output_dir``).
        extra_tags: tags added to ``text-to-image``, ``diffusers``, ``lora``, ``comat``, ``diffusers-training``.
    """
    image_links = [_path_in_folder(path, output_dir) for path in image_paths]
    tags = ["text-to-image", "diffusers", "lora", "comat", "diffusers-training", *extra_tags]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="openrail++" if "xl" in pipeline_class_name.lower() else "creativeml-openrail-m",
        tags=tags,
        widget=[{"text": validation_prompt or "", "output": {"url": link}} for link in image_links],
    )
    lora_id = repo_id or output_dir
    if training_settings:
        settings_table = "| flag | value |\n|---|---|\n" + "\n".join(
            f"| `{key}` | `{value}` |" for key, value in training_settings.items()
        )
    else:
        settings_table = "Not recorded for this LoRA."
    images = "\n".join(f"![sample]({link})" for link in image_links)
    snippet_prompt = (validation_prompt or DEFAULT_SAMPLE_PROMPT).replace('"', "'")
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

pipe = DiffusionPipeline.from_pretrained("{base_model}", dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{lora_id}")
image = pipe("{snippet_prompt}").images[0]
```

## Samples

{images or "No validation images were generated for this run."}
{f"Prompt: `{validation_prompt}`" if image_links and validation_prompt else ""}

## Training settings

{settings_table}
"""
    ModelCard(content).save(os.path.join(output_dir, "README.md"))
    card_inputs = {
        "base_model": base_model,
        "pipeline_class_name": pipeline_class_name,
        "validation_prompt": validation_prompt,
        "image_paths": image_links,
        "extra_tags": list(extra_tags),
        "training_settings": training_settings,
    }
    with open(os.path.join(output_dir, MODEL_CARD_INPUTS_NAME), "w", encoding="utf-8") as f:
        json.dump(card_inputs, f, indent=2)


def read_model_card_inputs(folder):
    """What :func:`save_model_card` recorded for ``folder``; for older folders, what their README.md says."""
    inputs_path = os.path.join(folder, MODEL_CARD_INPUTS_NAME)
    if os.path.isfile(inputs_path):
        with open(inputs_path, encoding="utf-8") as f:
            return json.load(f)
    readme_path = os.path.join(folder, "README.md")
    if os.path.isfile(readme_path):
        base_model = ModelCard.load(readme_path).data.base_model
        if base_model:
            return {"base_model": base_model}
    return {}


def prepare_hub_repo(repo_id, private=False):
    """Before training (``--push_to_hub``): check that there is a login and that ``repo_id`` can be created or
    written, so that a run does not learn it hours later. Returns the full repo id; raises ValueError saying what
    to do."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or train without "
                         "--push_to_hub and upload later with `python pipeline_comat.py push`.")
    if get_token() is None:
        raise ValueError("--push_to_hub needs a Hub login: run `hf auth login` (or set HF_TOKEN), then start again.")
    try:
        return HfApi().create_repo(repo_id, exist_ok=True, private=private).repo_id
    except Exception as error:  # noqa: BLE001 - HTTP, connection and auth failures all get the same actionable message
        raise ValueError(
            f"--push_to_hub: cannot create or write the Hub repo {repo_id} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Check the connection to {constants.ENDPOINT}, that your login can write there (`hf auth whoami`), and --hub_model_id."
        ) from None


def push_command(folder, repo_id):
    return f"python pipeline_comat.py push --lora_dir {folder} --repo_id {repo_id}"


def push_folder_to_hub(folder, repo_id, private=False, commit_message="Upload CoMat LoRA"):
    """Create (if needed) the model repo and upload ``folder`` without resume-only files; returns the repo id."""
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"{folder} has no {LORA_WEIGHTS_NAME}: push a folder written by train_comat.py / train_comat_sdxl.py."
        )
    # Made per call, so that it uses the endpoint configured now (HF_ENDPOINT, default https://huggingface.co).
    api = HfApi()
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
    logger.info(f"Uploaded {folder} to {api.endpoint}/{repo_id}")
    return repo_id


def push_lora_to_hub(
    folder,
    repo_id,
    base_model=None,
    sample_images=(),
    sample_prompt=None,
    private=False,
    commit_message="Upload CoMat LoRA",
):
    """Render the model card of ``folder`` for ``repo_id`` and upload the folder; returns the repo id.

    The card keeps what the training run recorded (base model, settings, sample images and their prompt);
    arguments given here replace it. Sample images outside ``folder`` are copied into ``folder/samples`` so
    that they are uploaded with the card. Without a recorded or given base model the card cannot say what
    the LoRA applies to, so that is an error.
    """
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS_NAME)):
        raise FileNotFoundError(f"{folder} has no {LORA_WEIGHTS_NAME}: it is not a CoMat LoRA folder.")
    recorded = read_model_card_inputs(folder)
    base_model = base_model or recorded.get("base_model")
    if not base_model:
        raise ValueError(
            f"{folder} does not record its base model (no {MODEL_CARD_INPUTS_NAME} or README.md metadata): "
            "pass the base model (--base_model) for the model card."
        )
    pipeline_class_name = recorded.get("pipeline_class_name") or (
        "StableDiffusionXLPipeline" if "xl" in base_model.lower() else "StableDiffusionPipeline"
    )
    if sample_images:
        image_paths = [_copy_into_folder(path, folder) for path in sample_images]
    else:
        image_paths = [os.path.join(folder, link) for link in recorded.get("image_paths", [])]
    save_model_card(
        folder,
        base_model,
        pipeline_class_name,
        recorded.get("training_settings", {}),
        validation_prompt=sample_prompt or recorded.get("validation_prompt"),
        image_paths=image_paths,
        repo_id=repo_id,
        extra_tags=recorded.get("extra_tags", ()),
    )
    return push_folder_to_hub(folder, repo_id, private=private, commit_message=commit_message)


def _copy_into_folder(path, folder):
    """``path`` itself if it lies inside ``folder``, else a copy of it in ``folder/samples``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sample image {path} does not exist.")
    folder_abs = os.path.abspath(folder)
    if os.path.commonpath([os.path.abspath(path), folder_abs]) == folder_abs:
        return path
    samples_dir = os.path.join(folder, SAMPLES_DIR_NAME)
    os.makedirs(samples_dir, exist_ok=True)
    return shutil.copy(path, os.path.join(samples_dir, os.path.basename(path)))
