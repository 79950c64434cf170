"""Memory the discriminator's UNet forwards keep for backward, with and without gradient checkpointing.

Fidelity Preservation runs D three times an iteration with gradient: on the generated latents for the
generator's adversarial loss, and on the reference and the detached generated latents for D's own loss. Without
checkpointing each call keeps every UNet activation until backward. This measures the bytes those calls save
for backward (unique tensor storages, counted with ``torch.autograd.graph.saved_tensors_hooks``) on the real
architectures with random weights, in half precision as trained (bf16 on CPU: the same 2 bytes per value as
fp16 on a GPU), through :class:`utils.training_loop.FidelityPreservation`'s own calls.

    OMP_NUM_THREADS=2 python benchmarks/bench_discriminator_memory.py --arch sd15 --resolution 512
    OMP_NUM_THREADS=2 python benchmarks/bench_discriminator_memory.py --arch sdxl --resolution 512
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_iteration import SD15_UNET_CONFIG, SDXL_UNET_CONFIG  # noqa: E402

from utils.fidelity_preservation import UNetDiscriminator, discriminator_loss, generator_adversarial_loss  # noqa: E402
from utils.training import lora_config  # noqa: E402


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def measure(arch, resolution, batch_size, rank, dtype):
    from diffusers import UNet2DConditionModel

    config = SD15_UNET_CONFIG if arch == "sd15" else SDXL_UNET_CONFIG
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(dtype)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank))
    discriminator = UNetDiscriminator.from_unet(unet, rank)
    side = resolution // 8
    latents = torch.randn(batch_size, 4, side, side, dtype=torch.float32, requires_grad=True)
    empty_prompt = torch.zeros(batch_size, 77, config["cross_attention_dim"], dtype=dtype)
    added = None
    if arch == "sdxl":
        added = {"text_embeds": torch.zeros(batch_size, 1280, dtype=dtype),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size, dtype=dtype)}
    timestep = torch.tensor(1)

    def generator_pass():  # the adversarial G loss: D frozen, gradient into the latents
        generator_adversarial_loss(discriminator(latents, timestep, empty_prompt, added))

    def discriminator_pass():  # D's step: its LoRA and head trainable, on reference and detached latents
        discriminator.requires_grad_(True)
        try:
            real = discriminator(latents.detach(), timestep, empty_prompt, added)
            fake = discriminator(latents.detach(), timestep, empty_prompt, added)
            discriminator_loss(real, fake)
        finally:
            discriminator.requires_grad_(False)

    results = {}
    for checkpointing in (False, True):
        discriminator.gradient_checkpointing = checkpointing
        results["checkpointing" if checkpointing else "no_checkpointing"] = {
            "generator_pass_MiB": saved_bytes(generator_pass) / 2**20,
            "discriminator_pass_MiB": saved_bytes(discriminator_pass) / 2**20,
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="UNet architecture (random weights).")
    parser.add_argument("--resolution", type=int, default=512, help="Image size in px (latents are 1/8 of it).")
    parser.add_argument("--batch_size", type=int, default=1, help="Samples per D call.")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank of D (recipe: 128).")
    parser.add_argument("--output", default=None, help="Write the results as JSON to this path.")
    args = parser.parse_args(argv)
    results = dict(vars(args), dtype="bfloat16", **measure(args.arch, args.resolution, args.batch_size, args.rank, torch.bfloat16))
    for mode in ("no_checkpointing", "checkpointing"):
        row = results[mode]
        print(f"{args.arch} {args.resolution}px batch {args.batch_size}, {mode:17s}: G pass {row['generator_pass_MiB']:9.1f} MiB, "
              f"D pass {row['discriminator_pass_MiB']:9.1f} MiB")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
