"""Shared fixtures: tiny models built once per test session and loaded through ``from_pretrained``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from utils import tiny_models  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return tiny_models.save_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    return tiny_models.save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny") / "sdxl"))


@pytest.fixture(scope="session")
def tiny_blip_path(tmp_path_factory):
    return tiny_models.save_tiny_blip(str(tmp_path_factory.mktemp("tiny") / "blip"))
