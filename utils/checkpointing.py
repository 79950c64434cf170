"""Atomic, verified, pickle-free training checkpoints, and the output folder a run owns.

A checkpoint ``output_dir/checkpoint-N/`` holds everything a resumed run needs to continue as if it
had never stopped:

* ``pytorch_lora_weights.safetensors`` — the generator LoRA in diffusers format (loadable on its own
  with ``pipe.load_lora_weights(checkpoint_dir)``);
* ``optimizer.safetensors`` + ``optimizer.json`` — every optimizer's state tensors and param groups;
* ``lr_scheduler.json`` — every LR scheduler's state;
* the states of other trainable parts (e.g. the discriminator's ``discriminator.safetensors``);
* ``rng_state_<rank>.safetensors`` + ``.json`` — each process's torch/numpy/python RNG states;
* ``training_state.json`` — global step, data position, the run's settings that a resume must keep, and
  the SHA-256 of every other file; written last, so a folder without it is never a checkpoint.

Everything is safetensors or JSON: nothing is unpickled on resume. (accelerate's ``save_state`` writes
the optimizer, scheduler and RNG states with pickle, which is why it is not used here.)

Guarantees:

* **Atomic**: files are written into ``checkpoint-N.partial/`` and fsynced; the main process renames the
  folder to ``checkpoint-N`` (and fsyncs the parent) only once every process has finished. A run killed
  while saving leaves a ``.partial`` folder that is never resumed from and is removed by the next run.
* **Prune after save**: ``--checkpoints_total_limit`` removes old checkpoints only once the new one is
  complete, each by renaming it away (``.deleting``) before deleting it, so a kill never leaves a
  half-deleted folder that looks complete.
* **Verified on resume**: every file is checked against its checksum before anything is loaded;
  ``latest`` skips a checkpoint that fails (saying which file and why) and takes the newest that passes.
"""

import fcntl
import hashlib
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
LOCK_NAME = ".comat.lock"
# Debris of interrupted saves and deletions (checkpoint-N.partial, .stale, .deleting).
LEFTOVER_PATTERN = re.compile(r"^checkpoint-\d+\.(partial|stale|deleting)$")
RUN_PRODUCTS = ("pytorch_lora_weights.safetensors",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
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
    _fsync_file(os.path.join(directory, f"{name}.safetensors"))
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
    """Write ``output_dir/checkpoint-<global_step>`` atomically on every process (collective call), then prune.

    ``save_lora_weights(directory)`` writes the diffusers-format LoRA; each of ``extra_states`` has
    ``save(directory)`` / ``load(directory)`` methods for its own files (safetensors/JSON).
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial_dir = final_dir + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
        os.makedirs(partial_dir)
    accelerator.wait_for_everyone()

    tensors, extra = rng_state()
    rng_path = os.path.join(partial_dir, f"rng_state_{accelerator.process_index}.safetensors")
    save_file(tensors, rng_path)
    _fsync_file(rng_path)
    _write_json(rng_path.replace(".safetensors", ".json"), extra)
    if accelerator.is_main_process:
        save_lora_weights(partial_dir)
        save_state_dicts(partial_dir, "optimizer", [opt.state_dict() for opt in optimizers])
        _write_json(os.path.join(partial_dir, "lr_scheduler.json"), [s.state_dict() for s in lr_schedulers])
        for state_owner in extra_states:
            state_owner.save(partial_dir)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        files = {}
        for name in sorted(os.listdir(partial_dir)):
            path = os.path.join(partial_dir, name)
            _fsync_file(path)  # files written by libraries (the LoRA) are not fsynced by them
            files[name] = _sha256(path)
        state = dict(training_state, global_step=global_step, num_processes=accelerator.num_processes, files=files)
        _write_json(os.path.join(partial_dir, TRAINING_STATE_NAME), state)
        _fsync_dir(partial_dir)
        if os.path.isdir(final_dir):
            # Re-saving a step (e.g. a preemption right after a resume): swap, never delete first.
            stale_dir = final_dir + ".stale"
            shutil.rmtree(stale_dir, ignore_errors=True)
            os.rename(final_dir, stale_dir)
            os.rename(partial_dir, final_dir)
            _fsync_dir(output_dir)
            shutil.rmtree(stale_dir)
        else:
            os.rename(partial_dir, final_dir)
            _fsync_dir(output_dir)
        logger.info(f"Saved checkpoint {final_dir}")
        if checkpoints_total_limit is not None:
            prune_checkpoints(output_dir, checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def list_checkpoints(output_dir):
    """Checkpoint folders in ``output_dir`` that finished saving (``training_state.json`` present), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_checkpoint(path):
    """Delete a checkpoint so that no reader ever sees it half-deleted: rename it away, then delete."""
    doomed = path + ".deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(doomed)


def prune_checkpoints(output_dir, keep):
    """Delete the oldest checkpoints so that at most ``keep`` remain."""
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        logger.info(f"--checkpoints_total_limit: removing {path}")
        remove_checkpoint(path)


def verify_checkpoint(path):
    """The training state of checkpoint folder ``path``, after checking every file against its checksum;
    raises :class:`CheckpointError` naming the first file that is missing or damaged."""
    state_path = os.path.join(path, TRAINING_STATE_NAME)
    try:
        state = _read_json(state_path)
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{state_path} is unreadable ({type(error).__name__}: {error}).") from None
    for name, checksum in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path} is missing.")
        if _sha256(file_path) != checksum:
            raise CheckpointError(f"{file_path} is damaged (its content does not match the checksum saved with it).")
    return state


def find_resume_checkpoint(resume_from_checkpoint, output_dir):
    """``(folder, training state)`` to resume from, or ``(None, None)`` for a new run.

    ``latest`` takes the newest checkpoint that verifies, with a warning for each newer one it skips; with none
    at all it starts a new run. A named folder must verify."""
    if resume_from_checkpoint is None:
        return None, None
    if resume_from_checkpoint == "latest":
        problems = []
        for path in reversed(list_checkpoints(output_dir)):
            try:
                return path, verify_checkpoint(path)
            except CheckpointError as error:
                logger.warning(f"--resume_from_checkpoint latest: skipping {os.path.basename(path)}: {error}")
                problems.append(str(error))
        if problems:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir} can be resumed from ({'; '.join(problems)}). "
                "Restore or delete them, or start over with --overwrite_output_dir."
            )
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet, starting a new run.")
        return None, None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
        raise CheckpointError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder (no "
            f"{TRAINING_STATE_NAME}). Pass 'latest' or a checkpoint-N folder written by this script."
        )
    return path, verify_checkpoint(path)


class _NamingTheFile:
    """Turns a failure to read ``path`` into a :class:`CheckpointError` that names it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, error, traceback):
        if error is not None and isinstance(error, Exception) and not isinstance(error, CheckpointError):
            raise CheckpointError(f"{self.path} could not be loaded ({type(error).__name__}: {error}).") from error
        return False


def load_checkpoint(accelerator, checkpoint_dir, load_lora_weights, optimizers, lr_schedulers, extra_states=()):
    """Restore what :func:`save_checkpoint` wrote (verify it first with :func:`find_resume_checkpoint`).
    Returns the saved training state dict."""
    with _NamingTheFile(os.path.join(checkpoint_dir, TRAINING_STATE_NAME)):
        training_state = _read_json(os.path.join(checkpoint_dir, TRAINING_STATE_NAME))
    with _NamingTheFile(os.path.join(checkpoint_dir, "pytorch_lora_weights.safetensors")):
        load_lora_weights(checkpoint_dir)
    with _NamingTheFile(os.path.join(checkpoint_dir, "optimizer.safetensors")):
        for optimizer, state_dict in zip(optimizers, load_state_dicts(checkpoint_dir, "optimizer"), strict=True):
            optimizer.load_state_dict(state_dict)
    with _NamingTheFile(os.path.join(checkpoint_dir, "lr_scheduler.json")):
        for scheduler, state_dict in zip(lr_schedulers, _read_json(os.path.join(checkpoint_dir, "lr_scheduler.json")), strict=True):
            scheduler.load_state_dict(state_dict)
    for state_owner in extra_states:
        with _NamingTheFile(f"{checkpoint_dir} ({type(state_owner).__name__})"):
            state_owner.load(checkpoint_dir)
    rng_path = os.path.join(checkpoint_dir, f"rng_state_{accelerator.process_index}.safetensors")
    if os.path.isfile(rng_path):
        with _NamingTheFile(rng_path):
            set_rng_state(load_file(rng_path), _read_json(rng_path.replace(".safetensors", ".json")))
    else:
        logger.warning(f"{rng_path} not found (resuming on more processes than saved); RNG states not restored.")
    return training_state


class OutputDirInUse(ValueError):
    pass


def claim_output_dir(output_dir, resuming, overwrite):
    """Make ``output_dir`` this run's own (main process, before any model loads); returns the lock to keep open.

    Refuses a folder another live run holds (an exclusive ``flock`` on ``.comat.lock``, released when the
    process ends, however it ends), and a folder with an earlier run's checkpoints or LoRA unless ``resuming``
    it or told to ``overwrite`` it (its checkpoints and LoRA are then removed). Removes the debris of
    interrupted saves."""
    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, LOCK_NAME), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise OutputDirInUse(
            f"--output_dir {output_dir} is in use by another run (process {holder}). Wait for it to finish, or give "
            "this run another --output_dir."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} on {os.uname().nodename}\n")
    lock.flush()

    earlier = [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))
               if CHECKPOINT_PATTERN.match(name) or name in RUN_PRODUCTS]
    if earlier and not resuming:
        if not overwrite:
            lock.close()
            names = ", ".join(os.path.basename(path) for path in earlier[:3]) + (", …" if len(earlier) > 3 else "")
            raise ValueError(
                f"--output_dir {output_dir} already holds a run ({names}). Resume it with --resume_from_checkpoint "
                "latest, replace it with --overwrite_output_dir, or choose another --output_dir."
            )
        logger.warning(f"--overwrite_output_dir: removing the earlier run's {len(earlier)} checkpoint(s)/LoRA in {output_dir}")
        for path in earlier:
            if os.path.isdir(path):
                remove_checkpoint(path)
            else:
                os.remove(path)
    remove_leftovers(output_dir)
    return lock


def remove_leftovers(output_dir):
    """Delete the folders interrupted saves and deletions leave behind (``checkpoint-N.partial`` …)."""
    for name in os.listdir(output_dir):
        if LEFTOVER_PATTERN.match(name):
            logger.info(f"Removing {name}, left by an interrupted save")
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def remove_unused_output_dir(output_dir):
    """Delete an output folder this run created if it holds no file but the lock (a run that failed before
    training leaves nothing behind)."""
    for root, _, names in os.walk(output_dir):
        if any(not (root == output_dir and name == LOCK_NAME) for name in names):
            return
    shutil.rmtree(output_dir, ignore_errors=True)
