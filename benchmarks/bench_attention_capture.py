"""Cost of cross-attention capture: a UNet step with and without it, against the authors' approach.

Times a UNet call on a classifier-free-guidance batch of 2 (uncond + cond, 77 text tokens) with grad
enabled, as at a gradient step of CoMat's online sampler, for four attention set-ups:

* ``sdpa``: stock ``AttnProcessor2_0`` on every layer (the baseline);
* ``capture_idle``: capture installed on the selected layers but not capturing (the K − r gradient steps
  without attention loss, and every no-grad step): should cost nothing;
* ``capture_on``: capture installed and capturing (the r attention-loss steps);
* ``explicit_all``: an explicit-softmax processor (diffusers' ``AttnProcessor``) on *every* attention layer,
  which is what the authors' code runs at every step, captured or not.

Each set-up is timed for a forward pass and for forward + backward (LoRA of rank ``--lora_rank`` on
to_q/to_k/to_v/to_out.0 as the only trainable weights; with capture on, the loss also includes the maps).
Models: the tiny test UNet and the full SD1.5 UNet architecture (random weights, built from its config).
Rounds interleave the set-ups so that load drift on shared machines hits them alike. The table reports the
best round (least disturbed by other processes) of wall time and of process CPU time, with their ratio to
``sdpa``; the JSON also keeps every round and the medians. On CUDA the peak allocated memory is reported.

Example::

    python benchmarks/bench_attention_capture.py --resolution 256 --output bench_attention_capture.json
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from peft import LoraConfig  # noqa: E402

from utils.attention_capture import (  # noqa: E402
    SD_DEFAULT_ATTENTION_LAYERS,
    install_attention_capture,
    remove_attention_capture,
)
from utils.tiny_models import tiny_sd_unet  # noqa: E402

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# The tiny UNet has no 8 x 8 (at 512 px) level; its mid and up cross-attention layers play the defaults' role.
MODELS = {
    "tiny": (lambda: tiny_sd_unet(seed=0), "mid,up"),
    "sd15": (lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), SD_DEFAULT_ATTENTION_LAYERS),
}
VARIANTS = ("sdpa", "capture_idle", "capture_on", "explicit_all")
MODES = ("forward", "forward_backward")
VAE_SCALE_FACTOR = 8
TEXT_TOKENS = 77


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "sd15"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--resolution", type=int, default=256, help="Image resolution in px (latents: / 8).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--lora_rank", type=int, default=128, help="Rank of the trainable LoRA (recipe: 128).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="As the recipe's gradient steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds before the timed ones.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds (each runs every set-up once).")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Write the results as JSON to this path.")
    return parser.parse_args()


def build_unet(model, args, dtype):
    torch.manual_seed(args.seed)
    unet = MODELS[model][0]().to(args.device)
    if dtype != torch.float32:
        unet.to(dtype=dtype)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    cast_training_params(unet, dtype=torch.float32)  # LoRA weights in fp32, as in the recipe
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def make_inputs(unet, args, dtype):
    generator = torch.Generator().manual_seed(args.seed)
    side = args.resolution // VAE_SCALE_FACTOR
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, unet.config.cross_attention_dim, generator=generator)
    return latents.to(args.device, dtype), torch.tensor(500, device=args.device), text.to(args.device, dtype)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_once(unet, inputs, variant, mode, layer_spec, args):
    """One timed UNet call (and backward) under one attention set-up.

    Returns wall seconds, process CPU seconds (less sensitive than wall time to other processes on a shared
    CPU) and the peak allocated CUDA memory in bytes (None on CPU).
    """
    unet.set_attn_processor(AttnProcessor() if variant == "explicit_all" else AttnProcessor2_0())
    store = None
    if variant in ("capture_idle", "capture_on"):
        store = install_attention_capture(unet, layer_spec, args.resolution, VAE_SCALE_FACTOR)
    unet.zero_grad(set_to_none=True)
    is_cuda = torch.device(args.device).type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    synchronize(args.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    if variant == "capture_on":
        with store.capturing():
            sample = unet(*inputs).sample
    else:
        sample = unet(*inputs).sample
    if mode == "forward_backward":
        loss = sample.float().square().mean()
        if store is not None and store.step_maps:
            loss = loss + sum(m[..., 1].float().mean() for maps in store.maps.values() for m in maps)
        loss.backward()
    synchronize(args.device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = torch.cuda.max_memory_allocated(args.device) if is_cuda else None
    if store is not None:
        remove_attention_capture(unet, store)
    return seconds, cpu_seconds, peak


def benchmark_model(model, args):
    dtype = getattr(torch, args.dtype)
    unet = build_unet(model, args, dtype)
    inputs = make_inputs(unet, args, dtype)
    layer_spec = MODELS[model][1]
    results = []
    for mode in args.modes:
        times = {variant: [] for variant in VARIANTS}
        cpu_times = {variant: [] for variant in VARIANTS}
        peaks = {variant: [] for variant in VARIANTS}
        for round_index in range(args.warmup + args.rounds):
            for variant in VARIANTS:
                seconds, cpu_seconds, peak = run_once(unet, inputs, variant, mode, layer_spec, args)
                if round_index >= args.warmup:
                    times[variant].append(seconds)
                    cpu_times[variant].append(cpu_seconds)
                    if peak is not None:
                        peaks[variant].append(peak)
        for variant in VARIANTS:
            results.append(
                dict(
                    model=model,
                    mode=mode,
                    variant=variant,
                    layer_spec=layer_spec,
                    times_s=times[variant],
                    best_s=min(times[variant]),
                    median_s=statistics.median(times[variant]),
                    ratio_vs_sdpa=min(times[variant]) / min(times["sdpa"]),
                    cpu_times_s=cpu_times[variant],
                    best_cpu_s=min(cpu_times[variant]),
                    median_cpu_s=statistics.median(cpu_times[variant]),
                    cpu_ratio_vs_sdpa=min(cpu_times[variant]) / min(cpu_times["sdpa"]),
                    peak_memory_mib=max(peaks[variant]) / 2**20 if peaks[variant] else None,
                )
            )
    del unet
    return results


def print_table(results):
    header = (
        f"{'model':<6} {'mode':<17} {'variant':<13} {'wall s':>8} {'vs sdpa':>8} {'cpu s':>8} {'vs sdpa':>8} "
        f"{'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        peak = f"{row['peak_memory_mib']:.0f}" if row["peak_memory_mib"] is not None else "-"
        print(
            f"{row['model']:<6} {row['mode']:<17} {row['variant']:<13} {row['best_s']:>8.3f} "
            f"{row['ratio_vs_sdpa']:>7.3f}x {row['best_cpu_s']:>8.3f} {row['cpu_ratio_vs_sdpa']:>7.3f}x {peak:>9}"
        )


def main():
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.resolution % (VAE_SCALE_FACTOR * 8):
        raise ValueError("--resolution must be a multiple of 64 (latents divisible by the UNet's 3 downsamplings).")
    results = []
    for model in args.models:
        results.extend(benchmark_model(model, args))
    print_table(results)
    if args.output:
        report = dict(
            device=args.device,
            device_name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            threads=torch.get_num_threads(),
            dtype=args.dtype,
            resolution=args.resolution,
            cfg_batch=2,
            lora_rank=args.lora_rank,
            gradient_checkpointing=args.gradient_checkpointing,
            rounds=args.rounds,
            torch=torch.__version__,
            results=results,
        )
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
