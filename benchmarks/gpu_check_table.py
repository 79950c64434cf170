"""The GPU check's one table (``benchmarks/gpu_check.sh``), and its check of the trained LoRA.

    python benchmarks/gpu_check_table.py --check_lora gpu-check/train_fp16_ga2   # exits 1 unless finite
    python benchmarks/gpu_check_table.py --output_dir gpu-check                 # prints and writes table.md
"""

import argparse
import json
import os
import sys

ROWS = (
    ("sd15_512_b4.json", "SD1.5 arch., 512 px, batch 4, T 50, K 5, fp16"),
    ("sdxl_1024_b1.json", "SDXL arch., 1024 px, batch 1, T 50, K 5, fp16"),
    ("sdxl_512_b6.json", "SDXL arch., 512 px, batch 6, T 50, K 5, fp16"),
)


def check_lora(folder):
    import torch
    from safetensors.torch import load_file

    lora = load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    non_finite = sum(int((~torch.isfinite(t)).sum()) for t in lora.values())
    if non_finite:
        print(f"{folder}: the LoRA holds {non_finite} non-finite values")
        return 1
    print(f"{folder}: LoRA finite ({len(lora)} tensors)")
    return 0


def table(output_dir):
    lines = [
        "| configuration | code | s / iteration | peak GPU memory | overhead ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name, label in ROWS:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            report = json.load(f)
        for row in report["configurations"]:
            overhead = f"{row['overhead_ratio']:.3f}" if "overhead_ratio" in row else "–"
            code = "reference style" if row["name"] == "reference_style" else "ours"
            lines.append(f"| {label} | {code} | {row['seconds_per_iteration']:.2f} | {row['peak_memory_mib']:,.0f} MiB | {overhead} |")
    train = os.path.join(output_dir, "train_fp16_ga2.json")
    if os.path.isfile(train):
        with open(train) as f:
            seconds = json.load(f)["seconds"]
        lines.append(f"| train_comat.py, SD1.5 arch., 512 px, fp16, accumulation 2, 20 steps | ours | {seconds} s in all | – | LoRA finite |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="The gpu_check.sh output folder: print and write its table.")
    parser.add_argument("--check_lora", help="A training output folder: exit 1 unless its LoRA is finite.")
    args = parser.parse_args(argv)
    if bool(args.output_dir) == bool(args.check_lora):
        parser.error("give one of --output_dir and --check_lora")
    return check_lora(args.check_lora) if args.check_lora else table(args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
