"""Checkpoints: exact, pickle-free round trips; a save or a pruning that dies half-way never costs the run;
damaged checkpoints are named and skipped."""

import os

import pytest
import torch
from accelerate import Accelerator

from utils import checkpointing
from utils.checkpointing import (
    CheckpointError,
    claim_output_dir,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


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
    assert find_resume_checkpoint("latest", str(tmp_path))[0] == good
    # The next save of that step replaces the debris.
    save_checkpoint(accelerator, str(tmp_path), 4, Weights(model).save, [optimizer], [scheduler], {})
    assert not os.path.exists(tmp_path / "checkpoint-4.partial")
    assert find_resume_checkpoint("latest", str(tmp_path))[0].endswith("checkpoint-4")


def test_total_limit_prunes_oldest_and_bad_resume_path_is_explained(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    for step in (1, 2, 3):
        save_checkpoint(accelerator, str(tmp_path), step, Weights(model).save, [optimizer], [scheduler], {}, checkpoints_total_limit=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    assert find_resume_checkpoint("latest", str(tmp_path / "empty")) == (None, None)
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def test_a_save_killed_with_limit_one_keeps_the_previous_checkpoint(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    good = save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {}, checkpoints_total_limit=1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 4, Weights(model, crash=True).save, [optimizer], [scheduler], {}, checkpoints_total_limit=1)
    assert find_resume_checkpoint("latest", str(tmp_path))[0] == good


def test_a_pruning_killed_half_way_never_leaves_a_checkpoint_that_looks_complete(state, tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = state
    save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {})
    real_rmtree = checkpointing.shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        if path.endswith(".deleting") and os.path.isdir(path):  # the folder being pruned: lose its LoRA, then die
            os.remove(os.path.join(path, "pytorch_lora_weights.safetensors"))
            raise KeyboardInterrupt("killed while pruning")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 4, Weights(model).save, [optimizer], [scheduler], {}, checkpoints_total_limit=1)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-4"]
    assert find_resume_checkpoint("latest", str(tmp_path))[0].endswith("checkpoint-4")
    claim_output_dir(str(tmp_path), resuming=True, overwrite=False).close()  # the next run removes the debris
    assert sorted(os.listdir(tmp_path)) == [".comat.lock", "checkpoint-4"]


@pytest.mark.parametrize("damaged", ["optimizer.safetensors", "pytorch_lora_weights.safetensors", "rng_state_0.json", "training_state.json"])
def test_latest_skips_a_damaged_checkpoint_and_names_the_file(state, tmp_path, caplog, damaged):
    accelerator, model, optimizer, scheduler = state
    good = save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {})
    newest = save_checkpoint(accelerator, str(tmp_path), 4, Weights(model).save, [optimizer], [scheduler], {})
    path = os.path.join(newest, damaged)
    content = bytearray(open(path, "rb").read())
    content[len(content) // 2] ^= 0xFF  # one flipped byte
    open(path, "wb").write(bytes(content))
    assert find_resume_checkpoint("latest", str(tmp_path))[0] == good
    assert damaged in caplog.text and "skipping checkpoint-4" in caplog.text
    with pytest.raises(CheckpointError, match=damaged):
        find_resume_checkpoint(newest, str(tmp_path))


def test_latest_refuses_when_every_checkpoint_is_damaged(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    only = save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {})
    os.remove(os.path.join(only, "optimizer.json"))
    with pytest.raises(CheckpointError, match="optimizer.json is missing.*--overwrite_output_dir"):
        find_resume_checkpoint("latest", str(tmp_path))


def test_output_dir_is_refused_while_another_run_holds_it_or_when_it_holds_a_run(state, tmp_path):
    accelerator, model, optimizer, scheduler = state
    lock = claim_output_dir(str(tmp_path), resuming=False, overwrite=False)
    with pytest.raises(ValueError, match="in use by another run"):
        claim_output_dir(str(tmp_path), resuming=True, overwrite=False)
    save_checkpoint(accelerator, str(tmp_path), 2, Weights(model).save, [optimizer], [scheduler], {})
    lock.close()
    with pytest.raises(ValueError, match="already holds a run.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        claim_output_dir(str(tmp_path), resuming=False, overwrite=False)
    claim_output_dir(str(tmp_path), resuming=True, overwrite=False).close()
    claim_output_dir(str(tmp_path), resuming=False, overwrite=True).close()
    assert list_checkpoints(str(tmp_path)) == []
