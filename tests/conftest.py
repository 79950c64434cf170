"""Shared fixtures: tiny models built once per test session and loaded through ``from_pretrained``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from utils import tiny_models  # noqa: E402

# The tiny models gain nothing from intra-op threads, and on 2 shared cores the thread synchronisation
# makes them many times slower. (Training subprocesses get OMP_NUM_THREADS=1 from script_env.)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return tiny_models.save_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    return tiny_models.save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny") / "sdxl"))


@pytest.fixture(scope="session")
def tiny_blip_path(tmp_path_factory):
    return tiny_models.save_tiny_blip(str(tmp_path_factory.mktemp("tiny") / "blip"))


@pytest.fixture(scope="session")
def tiny_grounding_dino_path(tmp_path_factory):
    return tiny_models.save_tiny_grounding_dino(str(tmp_path_factory.mktemp("tiny") / "grounding_dino"))


@pytest.fixture(scope="session")
def tiny_sam_path(tmp_path_factory):
    return tiny_models.save_tiny_sam(str(tmp_path_factory.mktemp("tiny") / "sam"))


@pytest.fixture(scope="session")
def tiny_blip_vqa_path(tmp_path_factory):
    return tiny_models.save_tiny_blip_vqa(str(tmp_path_factory.mktemp("tiny") / "blip_vqa"))


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    return tiny_models.save_tiny_clip(str(tmp_path_factory.mktemp("tiny") / "clip"))


@pytest.fixture(scope="session")
def tiny_paths(tiny_sd_path, tiny_sdxl_path, tiny_blip_path, tiny_grounding_dino_path, tiny_sam_path, tiny_blip_vqa_path, tiny_clip_path):
    return {
        "sd": tiny_sd_path, "sdxl": tiny_sdxl_path, "blip": tiny_blip_path, "grounding_dino": tiny_grounding_dino_path,
        "sam": tiny_sam_path, "blip_vqa": tiny_blip_vqa_path, "clip": tiny_clip_path,
    }


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch_command(launcher, script, num_processes=1):
    """The command line that starts a training script the way users do."""
    import sys

    script = os.path.join(REPO_ROOT, script)
    if launcher == "python":
        return [sys.executable, script]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes), script]
    raise ValueError(launcher)


def run_script(launcher, script, args, num_processes=1, timeout=600, check=True, extra_env=None):
    """Run a training script in a subprocess; returns the CompletedProcess (stdout+stderr merged)."""
    import subprocess

    result = subprocess.run(
        launch_command(launcher, script, num_processes) + [str(a) for a in args],
        env=dict(script_env(), **(extra_env or {})), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited with {result.returncode}:\n{result.stdout[-6000:]}")
    return result
