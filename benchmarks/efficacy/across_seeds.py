"""One CoMat setting trained with several seeds: how far its gain and its fidelity spread, and how many runs meet the
target (issue 11: ≥ +20 held-out points over the base with the confidence intervals apart, the fidelity
statistics within 5% of the base's).

Reads the ``results.json`` of several ``experiment`` runs that differ only in ``--seed`` (in ``--train_flags``),
takes one model of each (``--model``, default ``full CoMat``: the last step), and writes a table per run, the mean
and SD over runs, and per run which of the target's conditions hold. The target's fidelity statistics are the three
the issue names (parsed by the judge, background cleanliness, Fréchet distance); the colours' distance off the
palette, which the project added to catch blends, is counted beside them. A statistic is "within 5%" when it is at
most 5% worse than the base's (higher is better for parsed and background cleanliness; lower for the distances).

    python -m benchmarks.efficacy.across_seeds efficacy-results/balanced-scene-in-place-full-w0.05-dlr5e-4-K5 \\
        efficacy-results/balanced-scene-in-place-full-w0.05-dlr5e-4-K5-seed{1,2,3} --output across_seeds.md
"""

import argparse
import json
import os
import re

import numpy as np

TARGET_GAIN = 20.0
BAND = 0.05
# statistic: (where it is in results.json, True when higher is better)
FIDELITY_STATISTICS = {
    "parsed": ("summary", True),
    "background_cleanliness": ("summary", True),
    "frechet_distance": ("fidelity", False),
    "off_palette_distance": ("summary", False),
}
TARGET_FIDELITY_STATISTICS = ("parsed", "background_cleanliness", "frechet_distance")


def training_seed(train_flags):
    """The ``--seed`` a run's ``--train_flags`` set: the last one, as argparse reads them; 0 when they set none (the
    experiment passes ``--seed 0`` before them)."""
    seeds = re.findall(r"--seed[ =](\d+)", train_flags or "")
    return int(seeds[-1]) if seeds else 0


def setting_of(results):
    """What a run trained and evaluated, but for its training seed: runs compared across seeds must agree on it."""
    flags = sorted(group.strip() for group in re.split(r"(?=--)", results.get("train_flags") or "")
                   if group.strip() and not re.fullmatch(r"--seed[ =]\d+", group.strip()))
    return json.dumps(dict(settings=results["settings"], train_flags=flags, captioner=results.get("captioner"),
                           split=results.get("split"), evaluation_prompts=results["evaluation_prompts"],
                           seeds=results["seeds"]), sort_keys=True)


def _statistic(results, model, name):
    where, _ = FIDELITY_STATISTICS[name]
    if name not in results[where][model]:
        raise SystemExit(f"a results.json has no {name!r} for {model!r}: it comes from an older experiment.py; "
                         "run its command again (the fine-tunes are reused) to add it.")
    entry = results[where][model][name]
    return entry["mean"] if isinstance(entry, dict) else entry


def worse_by(value, base_value, higher_is_better):
    """How much worse than the base a statistic is, as a share of the base's value (negative when better)."""
    change = (value - base_value) / base_value
    return -change if higher_is_better else change


def run_row(results, model):
    """One run's gain (points, paired with the base on the same prompts and seeds) and fidelity against the base."""
    summary = results["summary"]
    row = dict(
        seed=training_seed(results.get("train_flags")),
        gain=100 * (summary[model]["full_prompt_accuracy"]["mean"] - summary["base"]["full_prompt_accuracy"]["mean"]),
        gain_on_palette=100 * (summary[model]["full_prompt_accuracy_on_palette"]["mean"]
                               - summary["base"]["full_prompt_accuracy_on_palette"]["mean"]),
        row_mean=results["fidelity"][model]["row_mean"],
        row_sd=results["fidelity"][model]["row_sd"],
    )
    for name, (_, higher_is_better) in FIDELITY_STATISTICS.items():
        value, base_value = _statistic(results, model, name), _statistic(results, "base", name)
        row[name] = value
        row[f"{name}_worse_by"] = worse_by(value, base_value, higher_is_better)
    # the target asks for the model's and the base's confidence intervals of full-prompt accuracy not to overlap
    row["intervals_apart"] = bool(summary[model]["full_prompt_accuracy"]["ci95"][0]
                                  > summary["base"]["full_prompt_accuracy"]["ci95"][1])
    row["meets_gain"] = bool(row["gain"] >= TARGET_GAIN and row["intervals_apart"])
    row["fidelity_within_band"] = bool(all(row[f"{name}_worse_by"] <= BAND for name in TARGET_FIDELITY_STATISTICS))
    row["palette_within_band"] = bool(row["off_palette_distance_worse_by"] <= BAND)
    return row


def summarise(result_dirs, model="full CoMat"):
    """Per run rows, sorted by seed, and the mean and SD (over runs) of each number."""
    rows, settings = [], {}
    for result_dir in result_dirs:
        with open(os.path.join(result_dir, "results.json")) as f:
            results = json.load(f)
        settings.setdefault(setting_of(results), []).append(result_dir)
        if model not in results["summary"]:
            raise SystemExit(f"{result_dir}/results.json has no model {model!r} (it has {sorted(results['summary'])}); "
                             "pass the name shown in its results.md with --model.")
        rows.append(dict(run=os.path.basename(os.path.normpath(result_dir)), **run_row(results, model)))
    if len(settings) > 1:
        raise SystemExit("these runs differ in more than --seed (settings, other train flags, captioner, split or "
                         f"evaluation): {list(settings.values())}; compare runs of one experiment command.")
    rows.sort(key=lambda row: row["seed"])
    # every run evaluated the same base on the same prompts and seeds (checked above): any run's base will do
    numbers = [key for key, value in rows[0].items() if isinstance(value, float)]
    spread = {key: dict(mean=float(np.mean([row[key] for row in rows])),
                        sd=float(np.std([row[key] for row in rows], ddof=1)) if len(rows) > 1 else float("nan"))
              for key in numbers}
    return dict(model=model, runs=rows, spread=spread, base_frechet_distance=results["fidelity"]["base"]["frechet_distance"],
                base_frechet_distance_other_seeds=results["fidelity"]["base"].get("frechet_distance_other_seeds"),
                meet_gain=sum(row["meets_gain"] for row in rows),
                meet_target=sum(row["meets_gain"] and row["fidelity_within_band"] for row in rows),
                meet_target_and_palette=sum(row["meets_gain"] and row["fidelity_within_band"] and row["palette_within_band"]
                                            for row in rows))


def markdown(summary):
    def worse(row, name):
        return f"{100 * row[f'{name}_worse_by']:+.1f}%"

    lines = [f"| {summary['model']}, seed | Δ full prompt | Δ on the palette | parsed | background | Fréchet distance | "
             "off palette | rows |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary["runs"]:
        lines.append(f"| {row['seed']} | {row['gain']:+.1f} | {row['gain_on_palette']:+.1f} | "
                     f"{100 * row['parsed']:.1f}% ({worse(row, 'parsed')}) | "
                     f"{100 * row['background_cleanliness']:.2f}% ({worse(row, 'background_cleanliness')}) | "
                     f"{row['frechet_distance']:.3f} ({worse(row, 'frechet_distance')}) | "
                     f"{row['off_palette_distance']:.1f} ({worse(row, 'off_palette_distance')}) | "
                     f"{row['row_mean']:.1f} ± {row['row_sd']:.1f} |")
    spread = summary["spread"]
    lines.append(f"| mean ± SD over {len(summary['runs'])} seeds | {spread['gain']['mean']:+.1f} ± {spread['gain']['sd']:.1f} | "
                 f"{spread['gain_on_palette']['mean']:+.1f} ± {spread['gain_on_palette']['sd']:.1f} | "
                 f"{100 * spread['parsed']['mean']:.1f}% | {100 * spread['background_cleanliness']['mean']:.2f}% | "
                 f"{spread['frechet_distance']['mean']:.3f} ± {spread['frechet_distance']['sd']:.3f} | "
                 f"{spread['off_palette_distance']['mean']:.1f} | {spread['row_mean']['mean']:.1f} |")
    lines += ["", f"(in brackets: how much worse than the base). Gain ≥ +{TARGET_GAIN:.0f} with the confidence intervals of "
                  f"model and base apart: {summary['meet_gain']} of "
                  f"{len(summary['runs'])} seeds; with parsed, background and Fréchet distance within {100 * BAND:.0f}% of the "
                  f"base's as well (the target): {summary['meet_target']}; with the colours off the palette within "
                  f"{100 * BAND:.0f}% too: {summary['meet_target_and_palette']}."]
    if summary["base_frechet_distance_other_seeds"] is not None:
        noise = worse_by(summary["base_frechet_distance_other_seeds"], summary["base_frechet_distance"], higher_is_better=False)
        lines.append(f"The base model's Fréchet distance on as many other evaluation seeds: "
                     f"{summary['base_frechet_distance_other_seeds']:.3f} ({100 * noise:+.1f}%).")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result_dirs", nargs="+", help="output folders of benchmarks.efficacy.experiment runs that differ only in --seed.")
    parser.add_argument("--model", default="full CoMat",
                        help="which model of each run to read, as named in its results.md (default: %(default)s).")
    parser.add_argument("--output", default=None,
                        help="write the table here (Markdown) and the numbers beside it as JSON (default: print the table).")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    missing = [d for d in args.result_dirs if not os.path.isfile(os.path.join(d, "results.json"))]
    if missing:
        raise SystemExit(f"no results.json in {missing}: pass output folders of benchmarks.efficacy.experiment runs.")
    summary = summarise(args.result_dirs, args.model)
    table = markdown(summary)
    if args.output is None:
        print(table, end="")
        return
    with open(args.output, "w") as f:
        f.write(table)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
