"""Atomic, pickle-free training checkpoints.

A checkpoint ``output_dir/checkpoint-N/`` holds everything a resumed run needs to continue as if it
had never stopped:

* ``pytorch_lora_weights.safetensors`` — the generator LoRA in diffusers format (loadable on its own
  with ``pipe.load_lora_weights(checkpoint_dir)``);
* ``optimizer.safetensors`` + ``optimizer.json`` — every optimizer's state tensors and param groups;
* ``lr_scheduler.json`` — every LR scheduler's state;
* the states of other trainable parts (e.g. the discriminator's ``discriminator.safetensors``);
* ``rng_state_<rank>.safetensors`` + ``.json`` — each process's torch/numpy/python RNG states;
* ``training_state.json`` — global step and data position; written last, so a directory without it is
  never a checkpoint.

Everything is safetensors or JSON: nothing is unpickled on resume. (accelerate's ``save_state`` writes
the optimizer, scheduler and RNG states with pickle, which is why it is not used here.)

Atomicity: all files are written into ``checkpoint-N.partial/``; the main process renames it to
``checkpoint-N`` only once every process has finished writing. A run killed while saving leaves a
``.partial`` folder that :func:`latest_checkpoint` ignores and the next save removes.
"""

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tensor_tree_to_safetensors(tree, prefix, tensors):
    """Replace tensors in a nested dict/list by references, collecting them under flat keys.

    Dicts become lists of [key, value] pairs so that integer keys (optimizer param ids) survive JSON.
    """
    if isinstance(tree, torch.Tensor):
        key = prefix
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[k, _tensor_tree_to_safetensors(v, f"{prefix}.{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_tensor_tree_to_safetensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _tensor_tree_from_safetensors(tree, tensors):
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _tensor_tree_from_safetensors(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_tensor_tree_from_safetensors(v, tensors) for v in tree]
    return tree


def save_state_dicts(directory, name, state_dicts):
    """Save a list of (possibly nested) state dicts as ``name.safetensors`` (tensors) + ``name.json`` (structure)."""
    tensors = {}
    structure = [_tensor_tree_to_safetensors(sd, f"{i}", tensors) for i, sd in enumerate(state_dicts)]
    save_file(tensors, os.path.join(directory, f"{name}.safetensors"))
    _write_json(os.path.join(directory, f"{name}.json"), structure)


def load_state_dicts(directory, name):
    tensors = load_file(os.path.join(directory, f"{name}.safetensors"))
    structure = _read_json(os.path.join(directory, f"{name}.json"))
    return [_tensor_tree_from_safetensors(sd, tensors) for sd in structure]


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state()
    extra = {
        "python": _jsonable(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    return state, extra


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tuples(obj):
    return tuple(_tuples(x) for x in obj) if isinstance(obj, list) else obj


def set_rng_state(tensors, extra):
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tuples(extra["python"]))
    numpy_state = extra["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))


def save_checkpoint(
    accelerator,
    output_dir,
    global_step,
    save_lora_weights,
    optimizers,
    lr_schedulers,
    training_state,
    extra_states=(),
    checkpoints_total_limit=None,
):
    """Write ``output_dir/checkpoint-<global_step>`` atomically on every process (collective call).

    ``save_lora_weights(directory)`` writes the diffusers-format LoRA; each of ``extra_states`` has
    ``save(directory)`` / ``load(directory)`` methods for its own files (safetensors/JSON).
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial_dir = final_dir + ".partial"
    if accelerator.is_main_process:
        if checkpoints_total_limit is not None:
            prune_checkpoints(output_dir, checkpoints_total_limit - 1)
        shutil.rmtree(partial_dir, ignore_errors=True)
        os.makedirs(partial_dir)
    accelerator.wait_for_everyone()

    tensors, extra = rng_state()
    save_file(tensors, os.path.join(partial_dir, f"rng_state_{accelerator.process_index}.safetensors"))
    _write_json(os.path.join(partial_dir, f"rng_state_{accelerator.process_index}.json"), extra)
    if accelerator.is_main_process:
        save_lora_weights(partial_dir)
        save_state_dicts(partial_dir, "optimizer", [opt.state_dict() for opt in optimizers])
        _write_json(os.path.join(partial_dir, "lr_scheduler.json"), [s.state_dict() for s in lr_schedulers])
        for state_owner in extra_states:
            state_owner.save(partial_dir)
        state = dict(training_state, global_step=global_step, num_processes=accelerator.num_processes)
        _write_json(os.path.join(partial_dir, TRAINING_STATE_NAME), state)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if os.path.isdir(final_dir):
            # Re-saving a step (e.g. a preemption right after a resume): swap, never delete first.
            stale_dir = final_dir + ".stale"
            shutil.rmtree(stale_dir, ignore_errors=True)
            os.rename(final_dir, stale_dir)
            os.rename(partial_dir, final_dir)
            shutil.rmtree(stale_dir)
        else:
            os.rename(partial_dir, final_dir)
        logger.info(f"Saved checkpoint {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


def is_complete_checkpoint(path):
    return os.path.isfile(os.path.join(path, TRAINING_STATE_NAME))


def list_checkpoints(output_dir):
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete_checkpoint(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(output_dir, keep):
    """Delete the oldest complete checkpoints so that at most ``keep`` remain."""
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        logger.info(f"--checkpoints_total_limit: removing {path}")
        shutil.rmtree(path)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The checkpoint folder to resume from, or None (``latest`` with no checkpoint yet starts fresh)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting a new run.")
            return None
        return checkpoints[-1]
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path) or not is_complete_checkpoint(path):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder (no "
            f"{TRAINING_STATE_NAME}). Pass 'latest' or a checkpoint-N folder written by this script."
        )
    return path


def load_checkpoint(accelerator, checkpoint_dir, load_lora_weights, optimizers, lr_schedulers, extra_states=()):
    """Restore what :func:`save_checkpoint` wrote; returns the saved training state dict."""
    training_state = _read_json(os.path.join(checkpoint_dir, TRAINING_STATE_NAME))
    load_lora_weights(checkpoint_dir)
    saved_optimizers = load_state_dicts(checkpoint_dir, "optimizer")
    if len(saved_optimizers) != len(optimizers):
        raise ValueError(
            f"{checkpoint_dir} holds {len(saved_optimizers)} optimizer state(s), this run has {len(optimizers)}: resume "
            f"with the module flags (--fidelity_preservation …) of the run that wrote it."
        )
    for optimizer, state_dict in zip(optimizers, saved_optimizers):
        optimizer.load_state_dict(state_dict)
    for scheduler, state_dict in zip(lr_schedulers, _read_json(os.path.join(checkpoint_dir, "lr_scheduler.json"))):
        scheduler.load_state_dict(state_dict)
    for state_owner in extra_states:
        state_owner.load(checkpoint_dir)
    rng_path = os.path.join(checkpoint_dir, f"rng_state_{accelerator.process_index}.safetensors")
    if os.path.isfile(rng_path):
        set_rng_state(load_file(rng_path), _read_json(rng_path.replace(".safetensors", ".json")))
    else:
        logger.warning(f"{rng_path} not found (resuming on more processes than saved); RNG states not restored.")
    return training_state
