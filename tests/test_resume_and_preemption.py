"""What an operator does to a run: stop it through each launcher mid-step, resume it with changed flags, extend a
finished run, start a second run into a folder in use, pass a token. The run's work must never be lost, and every
refusal is one message (exit code 2), never a library traceback."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO_ROOT, launch_command, run_script, script_env
from test_train_comat import tiny_args

from utils.checkpointing import claim_output_dir, verify_checkpoint

SCRIPT = "train_comat.py"
SLOW_PHASE = "tests/workers/slow_phase.py"


def fast_args(paths, output_dir, **overrides):
    """The tiny run with Concept Matching only, small and short: what these tests check does not depend on it."""
    settings = dict(no_attribute_concentration=True, no_fidelity_preservation=True, resolution=32, num_inference_steps=2,
                    num_grad_steps=1)
    return tiny_args(paths, output_dir, **{**settings, **overrides})


def stop_when_slow(command, phase, signum=signal.SIGTERM, to_group=False):
    """Start ``command`` (a slow-phase run), send ``signum`` to the launcher (``to_group``: to every process of the
    run, as Ctrl-C in a terminal does) once the slow phase hangs; returns (exit code, output, seconds from the signal
    until every process of the run has exited)."""
    process = subprocess.Popen(
        command, env=dict(script_env(), SLOW_PHASE=phase), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    log = []
    for line in process.stdout:
        log.append(line)
        if "slow phase started" in line:
            break
    else:
        raise AssertionError("".join(log)[-4000:])
    time.sleep(1)
    sent = time.perf_counter()
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    # The output pipe reaches EOF only once the launcher *and* the trainer it started have exited.
    log.append(process.communicate(timeout=120)[0])
    return process.returncode, "".join(log), time.perf_counter() - sent


def single_checkpoint(output_dir):
    checkpoints = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    assert len(checkpoints) == 1, checkpoints
    return verify_checkpoint(os.path.join(output_dir, checkpoints[0]))


@pytest.mark.parametrize("launcher,signum,to_group", [
    ("accelerate", signal.SIGTERM, False), ("accelerate", signal.SIGINT, True), ("torchrun", signal.SIGTERM, False),
], ids=["accelerate-sigterm", "accelerate-ctrl-c", "torchrun-sigterm"])
def test_a_stop_through_the_launcher_saves_the_last_step_within_seconds_whatever_the_step_length(
    launcher, signum, to_group, tiny_paths, tmp_path
):
    """accelerate launch dies of SIGTERM without forwarding it (the trainer learns it from its parent's death) and of
    Ctrl-C before its trainer; torchrun forwards SIGTERM to both processes and SIGKILLs them 30 s later. The step in
    progress would take 10 minutes."""
    output_dir = str(tmp_path / launcher)
    num_processes = 2 if launcher == "torchrun" else 1
    command = launch_command(launcher, SLOW_PHASE, num_processes) + fast_args(
        tiny_paths, output_dir, max_train_steps=50, checkpointing_steps=1000)
    returncode, log, seconds = stop_when_slow(command, "step", signum, to_group)
    assert seconds < 20, log[-3000:]
    assert "Step 2 abandoned" in log and "Stopped at step 1" in log, log[-3000:]
    state = single_checkpoint(output_dir)
    assert state["global_step"] == 1 and state["num_processes"] == num_processes
    if launcher == "torchrun":
        assert returncode != 0


def test_sigterm_after_the_loop_still_writes_the_lora_and_model_card(tiny_paths, tmp_path):
    output_dir = str(tmp_path / "late")
    command = launch_command("python", SLOW_PHASE) + fast_args(
        tiny_paths, output_dir, max_train_steps=1, validation_prompt="a red book", num_validation_images=1)
    returncode, log, seconds = stop_when_slow(command, "validation")
    assert returncode == 128 + signal.SIGTERM and seconds < 20, log[-3000:]
    assert "Final validation abandoned" in log
    assert {"pytorch_lora_weights.safetensors", "README.md", "checkpoint-1"} <= set(os.listdir(output_dir))


def test_resume_applies_a_new_learning_rate_extends_a_finished_run_and_refuses_what_cannot_change(tiny_paths, tmp_path):
    output_dir = str(tmp_path / "run")
    run_script("python", SCRIPT, fast_args(tiny_paths, output_dir, max_train_steps=2, checkpointing_steps=1000,
                                           validation_prompt="a red book", num_validation_images=1, validation_steps=1))
    assert json.load(open(os.path.join(output_dir, "checkpoint-2", "training_state.json")))["global_step"] == 2  # the last step
    # One validation per validation step: the last step's is the final one, not a second one before it.
    assert sorted(os.listdir(os.path.join(output_dir, "validation"))) == ["step_000001_0.png", "step_000002_0.png"]

    # Extending the finished run with a lower learning rate: it resumes at step 2 and trains at the new rate.
    result = run_script("python", SCRIPT, fast_args(
        tiny_paths, output_dir, max_train_steps=3, learning_rate=1e-6, resume_from_checkpoint="latest", validation_steps=1))
    assert "Resumed from" in result.stdout and "at step 2" in result.stdout
    assert "learning rate of parameter group 0 0.001 -> 1e-06" in result.stdout
    optimizer = json.load(open(os.path.join(output_dir, "checkpoint-3", "optimizer.json")))
    groups = dict(optimizer[0]["__dict__"])["param_groups"]
    assert dict(groups[0]["__dict__"])["lr"] == 1e-6

    # Flags that shape the saved state or the prompt order: one message naming each, before any model loads.
    refused = run_script("python", SCRIPT, fast_args(
        tiny_paths, output_dir, max_train_steps=4, rank=8, train_batch_size=1, resume_from_checkpoint="latest"), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout
    assert "Cannot resume from" in refused.stdout and "--rank: 4 in the checkpoint, 8 now" in refused.stdout
    assert "--train_batch_size: 2 in the checkpoint, 1 now" in refused.stdout

    # A second run while one holds the folder (a new run into a used folder: test_checkpointing.py).
    lock = claim_output_dir(output_dir, resuming=True, overwrite=False)
    busy = run_script("python", SCRIPT, fast_args(tiny_paths, output_dir, resume_from_checkpoint="latest"), check=False)
    lock.close()
    assert busy.returncode == 2 and "is in use by another run" in busy.stdout and "Traceback" not in busy.stdout


def test_a_token_never_reaches_what_the_launcher_and_trainer_print(tiny_paths, tmp_path, capsys):
    import train_comat

    token = "hf_launcherTestToken0123456789abcdef"
    with pytest.raises(SystemExit) as exit_info:
        train_comat.parse_args(fast_args(tiny_paths, str(tmp_path / "a"), push_to_hub=True, hub_token=token))
    refusal = capsys.readouterr().err
    assert exit_info.value.code == 2 and "hf auth login" in refusal and "HF_TOKEN" in refusal and token not in refusal
    # A run that fails under accelerate launch prints its command line: the token from HF_TOKEN is not on it.
    failed = run_script("accelerate", SCRIPT, fast_args(tiny_paths, str(tmp_path / "b"), push_to_hub=True, train_data="missing.txt"),
                        check=False, extra_env={"HF_TOKEN": token})
    assert failed.returncode != 0 and "missing.txt" in failed.stdout
    assert token not in failed.stdout
