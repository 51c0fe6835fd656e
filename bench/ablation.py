"""The seeds' techniques one at a time: does each help the default model at equal wall-clock?

Every variant is the ``tiny`` preset as shipped with *one* setting changed (:data:`VARIANTS`),
trained and scored by :mod:`bench.race`'s loop — same recipe, same batches, same wall-clock
budget, one fresh process each — in several seeds, so a difference can be told from noise:

* ``default`` — ``tiny`` as shipped (the reference of every row);
* ``srte`` — FusionTree's shared time encoding on the Mamba branch (sinusoidal; chapter 10);
* ``xpos`` — XPos instead of plain RoPE, scale base 512 as in Sun et al. (2022) (chapter 05);
* ``layer_scale`` — LayerScale at 0.1, CaiT's value up to 18 layers (chapter 11);
* ``drop_path`` — stochastic depth up to 0.1 in the last layer (chapter 11);
* ``deepnorm`` — DeepNet's post-norm residual with α, β for 4 layers (chapter 11);
* ``parallel_residual`` — mixer and FFN side by side on one norm (chapter 11);
* ``compile`` — the default model under ``torch.compile`` (a training option, not a model
  setting); its compilation runs in the untimed warm-up pass, reported on its own, and the
  table's last column counts the warm-up as training time (tokens/s with compilation included).

fp16 loss scaling and TF32 change nothing on a CPU (both are GPU number formats), so they are
not rows here; chapter 12 explains them.

    python -m bench.ablation                      # every variant, seeds 0 1 2, 60 s each (~30 min)
    python -m bench.ablation --variants default xpos --seeds 0 --seconds 30
    python -m bench.ablation --show               # the saved records as Markdown

Results go to ``bench/results/ablation.json``, one record per (seconds, lr, batch, sequence
length, seed) like the race's; the table pairs every variant with the default seed by seed.

:func:`ablation_table` renders its section of ``bench/RESULTS.md`` (every saved group, under
its device) from the data :mod:`bench.report` stores.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import RESULTS_DIR, race
from .race import RaceSettings
from .stats import mean_and_spread, wins_in_every_seed
from .tables import PerDevice, _device_blocks

RESULTS_FILE = RESULTS_DIR / "ablation.json"
DEFAULT_SECONDS = 60.0
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Variant:
    """One technique switched on in the default model: what it is, its chapter, its settings."""

    description: str
    chapter: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "default": Variant("`tiny` as shipped", "—"),
    "srte": Variant("SRTE, sinusoidal, on the Mamba branch", "10", {"srte": "sinusoidal"}),
    "xpos": Variant("XPos, scale base 512", "05", {"xpos_scale_base": 512}),
    "layer_scale": Variant("LayerScale, γ₀ = 0.1", "11", {"layer_scale_init": 0.1}),
    "drop_path": Variant("DropPath, 0 → 0.1 over depth", "11", {"drop_path_rate": 0.1}),
    "deepnorm": Variant("DeepNorm (post-norm, α = 8^¼)", "11", {"deepnorm": True}),
    "parallel_residual": Variant("parallel residual", "11", {"parallel_residual": True}),
    "compile": Variant("torch.compile (training option)", "12", {"compile": True}),
}


def variant_overrides(name: str) -> dict[str, Any]:
    """The settings ``name`` changes (checked: the config must accept them)."""
    overrides = dict(VARIANTS[name].overrides)
    model_settings = {k: v for k, v in overrides.items() if k != "compile"}
    race.preset_config().replaced(**model_settings)  # raises on a bad variant, before training
    return overrides


def run(
    variants: Sequence[str] = tuple(VARIANTS),
    settings: RaceSettings | None = None,
    *,
    corpus: str = race.CORPUS,
    data_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One seed's record: every variant as the race's ``hybrid`` entry with its overrides."""
    settings = RaceSettings() if settings is None else settings
    runs = {
        name: (variant_overrides(name), {"variant": VARIANTS[name].description,
               "chapter": VARIANTS[name].chapter, "overrides": VARIANTS[name].overrides})
        for name in variants
    }  # fmt: skip (checked before any training: variant_overrides raises on a bad variant)
    return race.run_variants("ablation", runs, settings, corpus=corpus, data_dir=data_dir,
                             echo=echo, design=race.current_design())  # fmt: skip


def save_record(record: dict[str, Any], path: str | Path = RESULTS_FILE) -> list[dict[str, Any]]:
    """As :func:`bench.race.save_record`, in the ablation's file."""
    return race.save_record(record, path, benchmark="ablation")


def summary_rows(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant over the seeds of ``group``: bpc and tokens/s (mean, sd), the mean paired
    bpc change against ``default`` and in how many seeds the variant's bpc was lower."""
    default = {
        r["settings"]["seed"]: r["entries"]["default"]
        for r in group
        if "val_bpc" in r["entries"].get("default", {})
    }
    rows = []
    for name, variant in VARIANTS.items():
        runs = {
            r["settings"]["seed"]: r["entries"][name]
            for r in group
            if "val_bpc" in r["entries"].get(name, {})
        }
        if not runs:
            continue
        shared = [seed for seed in runs if seed in default]
        deltas = [runs[s]["val_bpc"] - default[s]["val_bpc"] for s in shared]
        wins, _ = wins_in_every_seed(
            [runs[s]["val_bpc"] for s in shared], [default[s]["val_bpc"] for s in shared], False
        )
        speed_ratio = [runs[s]["tokens_per_s"] / default[s]["tokens_per_s"] for s in shared]
        rows.append({
            "name": name, "variant": variant.description, "chapter": variant.chapter,
            "seeds": sorted(runs), "params": next(iter(runs.values()))["params"],
            "bpc": mean_and_spread([r["val_bpc"] for r in runs.values()]),
            "tokens_per_s": mean_and_spread([r["tokens_per_s"] for r in runs.values()]),
            "delta": mean_and_spread(deltas) if deltas else None,
            "speed_ratio": sum(speed_ratio) / len(speed_ratio) if speed_ratio else None,
            "wins": wins, "paired": len(shared),
            "warm_up_s": mean_and_spread([r.get("warm_up_seconds", 0.0) for r in runs.values()]),
            # the warm-up counted as training time: what a compiled run pays for compiling
            "with_warm_up": mean_and_spread([
                r["tokens"] / (r["train_seconds"] + r.get("warm_up_seconds", 0.0))
                for r in runs.values()]),
        })  # fmt: skip
    return rows


def group_markdown(group: list[dict[str, Any]], level: int = 3) -> str:
    """One group of records (same settings, several seeds) as the ablation table."""
    s = group[0]["settings"]
    seeds = [r["settings"]["seed"] for r in group]
    lines = [
        f"{'#' * level} {s['seconds']:g} s per run · seeds {', '.join(map(str, seeds))} · lr "
        f"{s['lr']:g} · batch {s['batch_size']} × {s['seq_len']}",
        "",
        f"{group[-1]['date']}, {group[-1]['machine']}, {race.process_text(s)}, runs trained "
        f"{race.schedule_text(s, len(group[-1]['entries']))}. Mean ± sample sd "
        "over the seeds; Δ bpc is paired with the default run of the same seed (negative: the "
        f"technique helped). {earlier_tiny_note(group)}".rstrip(),
        "",
        "| technique | ch. | params | val bpc | Δ bpc vs default | lower in | tokens/s (× default) "
        "| warm-up s | tokens/s, warm-up included |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(group):
        delta = "–" if row["name"] == "default" or row["delta"] is None else (
            f"{row['delta'][0]:+.3f} ± {row['delta'][1]:.3f}")  # fmt: skip
        wins = "–" if row["name"] == "default" else f"{row['wins']} of {row['paired']}"
        ratio = "" if row["speed_ratio"] is None else f" ({row['speed_ratio']:.2f}×)"
        lines.append(
            f"| {row['name']}: {row['variant']} | {row['chapter']} | {row['params']:,} "
            f"| {row['bpc'][0]:.3f} ± {row['bpc'][1]:.3f} | {delta} | {wins} "
            f"| {row['tokens_per_s'][0]:,.0f}{ratio} | {row['warm_up_s'][0]:.1f} "
            f"| {row['with_warm_up'][0]:,.0f} |"
        )
    warnings = [race.load_warning(r) for r in group]
    return "\n".join(lines + [f"\n{w}" for w in warnings if w])


def groups(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records that share every setting but the seed (a single seed makes a group too)."""
    return race.seed_groups(records, min_size=1)


def earlier_tiny_note(group: list[dict[str, Any]]) -> str:
    """``""`` when ``group``'s default runs raced ``tiny`` as ``configs/`` has it now; else one
    sentence saying they raced an earlier ``tiny``, and how to race today's. Records carry the
    design since it changed (:func:`bench.race.hybrid_design`); older ones are told by the default
    run's parameter count."""
    if race.hybrid_design(group[0]) is not None:
        earlier = not race.raced_today(group[0])
    else:
        counts = {r["entries"]["default"]["params"] for r in group
                  if "params" in r["entries"].get("default", {})}  # fmt: skip
        earlier = counts != {race.entry_parameters(["hybrid"])["hybrid"]}
    if not earlier:
        return ""
    return ("These runs raced an earlier `tiny` than `configs/` holds now; "
            "`python -m bench.ablation` races today's.")


def markdown(records: list[dict[str, Any]], level: int = 3) -> str:
    if not records:
        return "No ablation saved yet: `python -m bench.ablation`."
    return "\n\n".join(group_markdown(g, level) for g in groups(records))


# ----------------------------------------------------------------------------------------------
# Its section of bench/RESULTS.md (rendered by bench.report)
# ----------------------------------------------------------------------------------------------
def ablation_table(per_device: PerDevice) -> str:
    """Every saved ablation group (:func:`markdown`), under its device."""
    return _device_blocks(per_device, lambda data: markdown(data["records"], level=4),
                          "Not run yet: `python -m bench.ablation`.")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ablation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each technique alone against the default tiny model, trained by "
        "bench.race's loop for the same wall-clock time in several seeds; print the table and "
        f"save it to {RESULTS_FILE.relative_to(race.ROOT)}.",
        epilog="variants:\n" + "\n".join(
            f"  {n:<18} {v.description} (chapter {v.chapter})" for n, v in VARIANTS.items()),
    )  # fmt: skip
    d = RaceSettings()
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        metavar="NAME", help="variants to run (default: all)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="seeds: weights and batches (%(default)s)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help="training seconds per run (%(default)g)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)g)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {race.QUICK_SECONDS:g} s per run, not saved")  # fmt: skip
    race.add_worker_arguments(parser)
    parser.add_argument("--no-save", action="store_true", help="do not write the results file")
    parser.add_argument("--show", action="store_true", help="print the saved records and exit")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        print(markdown(race.load_records(args.results)))
        return 0
    budget = race._QUICK if args.quick else {"seconds": args.seconds}
    every_seed = [race.settings_or_exit("python -m bench.ablation", **budget, lr=args.lr,
                                        seed=seed, **race.worker_settings(args))
                  for seed in args.seeds]  # fmt: skip
    records = []
    for settings in every_seed:
        seed = settings.seed
        record = run(args.variants, settings)
        records.append(record)
        if not (args.quick or args.no_save):
            # after every seed: a killed run keeps the rest
            if race.saved(record, save_record(record, args.results)):
                print(f"[ablation] seed {seed} saved to {args.results}")
    print()
    print(markdown(records))
    finished = [r for record in records for r in record["entries"].values() if "error" not in r]
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
