"""Loading pretrained models with errors that name the flag and the fix.

``from_pretrained`` on an id that is unreachable (offline, typo, gated) ends in a long traceback
from deep inside huggingface_hub. The training scripts load half a dozen models from flags, so
every load goes through :func:`load_pretrained`, which says which flag held the bad value.
"""

import json
import os

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import HfHubHTTPError
from safetensors import SafetensorError, safe_open


class ModelLoadError(OSError):
    """A model named by a flag could not be loaded."""


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def describe_load_failure(name_or_path, flag, error=None):
    """The message for a model that a flag names and that cannot be loaded."""
    if os.path.isdir(name_or_path):
        where = f"the folder {name_or_path!r} exists but does not hold a loadable model"
    elif _offline():
        where = f"{name_or_path!r} is not a local folder and HF_HUB_OFFLINE is set, so the Hub is not asked"
    else:
        where = f"{name_or_path!r} is neither a local folder nor a reachable Hugging Face Hub model id"
    detail = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
    return (
        f"Could not load {flag} {name_or_path}: {where}{detail}. Pass a local folder saved with "
        f"save_pretrained, check the id's spelling and your access, or download it first while online "
        f"(it is then found in the cache with HF_HUB_OFFLINE=1)."
    )


def _damaged_safetensors_file(folder):
    """The first ``.safetensors`` file under ``folder`` whose header cannot be read, or None."""
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(root, name), framework="pt"):
                        pass
                except (SafetensorError, OSError):
                    return os.path.join(root, name)
    return None


def load_pretrained(model_class, name_or_path, flag, **kwargs):
    """``model_class.from_pretrained(name_or_path, **kwargs)``, with a clear error naming ``flag`` (and the damaged
    file, when a weights file is)."""
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except SafetensorError as error:
        folder = os.path.join(name_or_path, kwargs.get("subfolder") or "") if os.path.isdir(name_or_path) else None
        damaged = (_damaged_safetensors_file(folder) if folder else None) or "one of its .safetensors files"
        raise ModelLoadError(
            f"Could not load {flag} {name_or_path}: {damaged} is damaged (SafetensorError: {error}). Download or save the "
            "model again (a Hub download: delete it from the cache first)."
        ) from error
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise ModelLoadError(describe_load_failure(name_or_path, flag, error)) from error


def read_model_index(name_or_path, revision=None, cache_dir=None):
    """The diffusers ``model_index.json`` of a pipeline checkpoint (folder or Hub id) as a dict."""
    flag = "--pretrained_model_name_or_path"
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"{flag} {name_or_path!r} has no model_index.json: it must be a diffusers pipeline folder "
                f"(as written by DiffusionPipeline.save_pretrained), not a single component or a .safetensors file."
            )
    else:
        try:
            path = hf_hub_download(name_or_path, "model_index.json", revision=revision, cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - every Hub failure gets the same actionable message
            raise ModelLoadError(describe_load_failure(name_or_path, flag, error)) from error
    with open(path, encoding="utf-8") as f:
        return json.load(f)


SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")


def is_sdxl_checkpoint(model_index):
    """SDXL checkpoints have a second text encoder; SD 1.x/2.x ones do not."""
    return model_index.get("_class_name") in SDXL_PIPELINE_CLASSES or "text_encoder_2" in model_index


def import_factory(flag, spec, signature):
    """The factory that ``--flag MODULE:NAME`` names (a user's replacement for a built-in model), imported; a bad
    name ends in a message that names the flag and the ``signature`` the factory must have."""
    import importlib

    module_name, _, factory_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{flag} {spec}: cannot import {factory_name!r} from module {module_name!r} ({error}). "
            f"Give MODULE:NAME of a factory {signature} that Python can import (the module on PYTHONPATH)."
        ) from error
