"""The optimizer set-up of a CoMat run: one optimizer (one fp16 grad scaler), the recipe's two parameter groups."""

import pytest
import torch
from accelerate import Accelerator

from test_train_comat import tiny_args


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_generator_and_discriminator_groups_have_their_own_settings(tiny_paths, tmp_path):
    import train_comat
    from utils.training_loop import CoMatIteration

    args = train_comat.parse_args(tiny_args(
        tiny_paths, str(tmp_path), lr_scheduler="linear", lr_warmup_steps=2, learning_rate=1e-3,
        discriminator_learning_rate=5e-4, report_to="none",
    ))
    comat = CoMatIteration(args, train_comat.StableDiffusionFamily(), Accelerator(cpu=True), max_train_steps=10)
    generator_group, discriminator_group = comat.optimizer.param_groups
    assert {id(p) for p in generator_group["params"]} == {id(p) for p in comat.lora_parameters}
    assert {id(p) for p in discriminator_group["params"]} == {id(p) for p in comat.fidelity.parameters}
    assert tuple(discriminator_group["betas"]) == (0.0, 0.999) and tuple(generator_group["betas"]) == (0.9, 0.999)
    assert all(p.dtype == torch.float32 for p in generator_group["params"] + discriminator_group["params"])
    # Warm-up and decay shape the generator's learning rate only; the discriminator's stays constant.
    learning_rates = []
    for _ in range(4):
        learning_rates.append([group["lr"] for group in comat.optimizer.param_groups])
        comat.lr_scheduler.step()
    assert [g for g, _ in learning_rates] == [0.0, 5e-4, 1e-3, 1e-3 * 7 / 8]
    assert [d for _, d in learning_rates] == [5e-4] * 4
