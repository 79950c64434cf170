"""Checkpoints: exact, pickle-free round trips, and a save that dies half-way never becomes `latest`."""

import os

import pytest
import torch
from accelerate import Accelerator

from utils.checkpointing import list_checkpoints, load_checkpoint, resolve_resume_checkpoint, save_checkpoint


class Weights:
    """Stands in for the LoRA writer: one tensor file, or a crash half-way through."""

    def __init__(self, module, crash=False):
        self.module, self.crash = module, crash

    def save(self, directory):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, os.path.join(directory, "pytorch_lora_weights.safetensors"))
        if self.crash:
            raise KeyboardInterrupt("killed while saving")

    def load(self, directory):
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(os.path.join(directory, "pytorch_lora_weights.safetensors")))


@pytest.fixture
def state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.0, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return Accelerator(cpu=True), model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng_exactly(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    path = save_checkpoint(accelerator, str(tmp_path), 3, Weights(model).save, [optimizer], [scheduler], {"micro_step": 3})
    assert not [n for n in os.listdir(path) if n.endswith((".bin", ".pkl", ".pt", ".pth"))]
    expected_next_random = torch.rand(3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optimizer = optimizer.state_dict()

    torch.manual_seed(123)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0 / (1 + step))
    training_state = load_checkpoint(accelerator, path, Weights(fresh).load, [fresh_optimizer], [fresh_scheduler])

    assert training_state["global_step"] == 3 and training_state["micro_step"] == 3
    for key, value in expected.items():
        assert torch.equal(fresh.state_dict()[key], value)
    loaded = fresh_optimizer.state_dict()
    assert list(loaded["param_groups"][0]["betas"]) == [0.0, 0.99] and loaded["param_groups"][0]["lr"] == expected_optimizer["param_groups"][0]["lr"]
    for param_id, param_state in expected_optimizer["state"].items():
        for name, value in param_state.items():
            assert torch.equal(loaded["state"][param_id][name], value)
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert torch.equal(torch.rand(3), expected_next_random)  # RNG restored to the moment of the save


def test_a_save_killed_half_way_is_never_latest(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    good = save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 4, Weights(model, crash=True).save, [optimizer], [scheduler], {})
    assert os.path.isdir(tmp_path / "checkpoint-4.partial") and not os.path.exists(tmp_path / "checkpoint-4")
    assert list_checkpoints(str(tmp_path)) == [good]
    assert resolve_resume_checkpoint("latest", str(tmp_path)) == good
    # The next save of that step replaces the debris.
    save_checkpoint(accelerator, str(tmp_path), 4, Weights(model).save, [optimizer], [scheduler], {})
    assert not os.path.exists(tmp_path / "checkpoint-4.partial")
    assert resolve_resume_checkpoint("latest", str(tmp_path)).endswith("checkpoint-4")


def test_total_limit_prunes_oldest_and_bad_resume_path_is_explained(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    for step in (1, 2, 3):
        save_checkpoint(accelerator, str(tmp_path), step, Weights(model).save, [optimizer], [scheduler], {}, checkpoints_total_limit=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    assert resolve_resume_checkpoint("latest", str(tmp_path / "empty")) is None
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))
