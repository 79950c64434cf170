"""Run by torchrun (2 gloo processes) from ``test_two_process_fp16.py``: fp16 with the CPU grad scaler, an overflow
on rank 1 only, then a normal step. Each rank writes what it saw to ``OUTPUT_DIR/rank_<r>.json``."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_comat  # noqa: E402
from test_train_comat import tiny_args  # noqa: E402
from utils.training import check_replicas_in_sync, make_accelerator  # noqa: E402
from utils.training_loop import CoMatIteration  # noqa: E402


def main(paths_json, output_dir):
    paths = json.loads(paths_json)
    args = train_comat.parse_args(tiny_args(
        paths, output_dir, mixed_precision="fp16", train_batch_size=1, num_inference_steps=2, num_grad_steps=1,
        no_attribute_concentration=True, reference_latents_dir=os.path.join(output_dir, "reference"),
    ))
    accelerator = make_accelerator(args)
    comat = CoMatIteration(args, train_comat.StableDiffusionFamily(), accelerator, max_train_steps=10)
    scaler, rank = accelerator.scaler, accelerator.process_index

    def gathered_scales():
        scales = [torch.zeros(1) for _ in range(accelerator.num_processes)]
        dist.all_gather(scales, torch.tensor([scaler.get_scale()]))
        return [s.item() for s in scales]

    def snapshot():
        return [p.detach().clone() for p in comat.trainable_parameters]

    record = {}
    _, finite = comat.micro_step(["a red book and a blue cup"], 0)
    before = snapshot()
    if rank == 1:
        comat.lora_parameters[0].grad.view(-1)[0] = float("inf")
    comat.update(finite, 0)
    after = snapshot()
    record["overflow_step_skipped"] = comat.optimizer.step_was_skipped
    record["unchanged_after_overflow"] = all(torch.equal(b, a) for b, a in zip(before, after))
    record["scales_after_overflow"] = gathered_scales()
    record["lr_steps_after_overflow"] = comat.lr_scheduler.last_epoch

    _, finite = comat.micro_step(["a green cat and a white dog"], 1)
    comat.update(finite, 1)
    record["second_step_skipped"] = comat.optimizer.step_was_skipped
    record["changed_after_second_step"] = any(not torch.equal(b, a) for b, a in zip(after, snapshot()))
    record["scales_after_second_step"] = gathered_scales()
    record["finite"] = all(bool(torch.isfinite(p).all()) for p in comat.trainable_parameters)
    try:
        check_replicas_in_sync(comat.trainable_parameters, accelerator)
        record["in_sync"] = True
    except RuntimeError as error:
        record["in_sync"] = str(error)
    with open(os.path.join(output_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(record, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
