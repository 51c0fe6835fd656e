"""Hybrid designs side by side: which way of combining Mamba and attention wins the race?

Every design is the ``tiny`` preset with a few model settings changed (:data:`DESIGNS`), trained
and scored by :mod:`bench.race`'s loop — same recipe, same batches, same wall-clock budget, one
fresh process each — so the table answers the question chapter 10 asks: what should a hybrid
*layer stack* look like when time is what you pay?

The designs are the ones the field uses (chapter 10 explains each):

* **parallel, gated** — both branches at full width in every layer, mixed by a learned low-rank
  gate (FusionTree's block; MiniFusion's earlier default);
* **parallel, averaged** — both branches in every layer with normalised outputs averaged, the
  Mamba branch at expansion 1 (Hymba's recipe of attention and SSM heads side by side);
* **interleaved** — whole layers of one kind or the other (Jamba, Samba), in two orders and
  two ratios;
* **a cheaper Mamba layer** — expansion 1 (the layer then has about an attention layer's
  parameters and time), and no feed-forward block after it (a Mamba block is a gated MLP around
  its scan; NVIDIA's Mamba-2-Hybrid keeps its MLPs as separate layers, not after every Mamba);
* **a richer Mamba layer** — ``tiny`` with a larger state per channel (32 or 64 instead of 16;
  the scan's work grows with it) or at expansion 2 (the Mamba paper's own block);
* **a better attention layer** — QK-norm (OLMo 2, Qwen3) and, on top, a sigmoid gate on every
  head's output (Qwen3-Next; Qiu et al. 2025, "Gated Attention for Large Language Models");
* **a control** — the last plan with attention in place of Mamba, to tell what the Mamba layers
  bring from what removing feed-forward blocks brings.

The all-attention and all-Mamba stacks are the references, and ``tiny`` is the preset as shipped
(the one design that keeps its global heads in a single layer and, with ``tiny-gated-attention``
and the QK-norm designs, the only ones whose attention is not plain: the designs were raced
before the preset took QK-norm and the output gate, and a rerun measures what was saved).

    python -m bench.designs                      # every design, 240 s each (~65 min on 2 cores)
    python -m bench.designs --designs attention interleaved-AMAM --seconds 120
    python -m bench.designs --designs tiny attention --corpus python-code --lr 3e-3
    python -m bench.designs --show               # the saved records as Markdown

Results go to ``bench/results/designs.json`` (one record per seconds/lr/batch/seq-len/seed, like
the race's), which chapter 10 reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import RESULTS_DIR, race
from .race import RaceSettings

RESULTS_FILE = RESULTS_DIR / "designs.json"
A, M = "attention", "mamba"
D, N = "dense", "none"  # feed-forward block after the mixer, or none
PLAIN_ATTENTION = {"attention_qk_norm": False, "attention_output_gate": False}


@dataclass(frozen=True)
class Design:
    """One way to build the ``tiny`` model: what it is, where it comes from, what changes."""

    description: str
    lineage: str
    overrides: dict[str, Any] = field(default_factory=dict)
    preset_global_heads: bool = False  # keep the preset's global-head layers (else: every layer)
    preset_attention: bool = False  # keep the preset's QK-norm and output gate (else: plain)


DESIGNS: dict[str, Design] = {
    "tiny": Design("the `tiny` preset as shipped (A-M-A-M, Mamba expand 1, no FFN after Mamba, "
                   "global heads in one layer, QK-norm and output gate)", "MiniFusion",
                   preset_global_heads=True, preset_attention=True),
    "tiny-plain-attention": Design(
        "`tiny` with plain attention (no QK-norm, no output gate): the default before the gated "
        "attention", "MiniFusion", preset_global_heads=True),
    "tiny-global-both": Design(
        "`tiny` with global heads in both attention layers (no all-local layer)", "MiniFusion"),
    "tiny-wide-ffn": Design(
        "`tiny` with feed-forward blocks twice as wide (768): the twins' parameter count, spent "
        "on the cheapest matmuls", "MiniFusion", {"intermediate_size": 768},
        preset_global_heads=True),
    "attention": Design("every layer attention + FFN (the attention twin)", "Llama", {
        "mixer_types": [A, A, A, A], "ffn_types": [D, D, D, D]}),
    "mamba": Design("every layer Mamba (expand 1) + FFN", "Mamba", {
        "mixer_types": [M, M, M, M], "ffn_types": [D, D, D, D], "mamba_expand": 1}),
    "parallel-gated": Design(
        "both branches in every layer, low-rank gate", "FusionTree",
        {"mixer_types": ["hybrid"] * 4, "ffn_types": [D, D, D, D], "fusion_gate": "lowrank",
         "fusion_gate_rank": 16, "mamba_expand": 2}),
    "parallel-averaged": Design(
        "both branches in every layer, normalised and averaged, Mamba expand 1", "Hymba",
        {"mixer_types": ["hybrid"] * 4, "ffn_types": [D, D, D, D], "fusion_gate": "average",
         "fusion_branch_norm": True, "mamba_expand": 1}),
    "interleaved-AMAM": Design("layers A-M-A-M, Mamba expand 2", "Jamba / Samba", {
        "mixer_types": [A, M, A, M], "ffn_types": [D, D, D, D], "mamba_expand": 2}),
    "interleaved-AMAM-e1": Design("layers A-M-A-M, Mamba expand 1", "Jamba / Samba", {
        "mixer_types": [A, M, A, M], "ffn_types": [D, D, D, D], "mamba_expand": 1}),
    "interleaved-AMAM-e1-noffn": Design(
        "layers A-M-A-M, Mamba expand 1, no FFN after Mamba", "Mamba-2-Hybrid",
        {"mixer_types": [A, M, A, M], "ffn_types": [D, N, D, N], "mamba_expand": 1}),
    "interleaved-MAMA-e1-noffn": Design(
        "layers M-A-M-A, Mamba expand 1, no FFN after Mamba", "Mamba-2-Hybrid",
        {"mixer_types": [M, A, M, A], "ffn_types": [N, D, N, D], "mamba_expand": 1}),
    "interleaved-AMMM-e1-noffn": Design(
        "1 attention : 3 Mamba (A-M-M-M), Mamba expand 1, no FFN after Mamba", "Jamba ratio",
        {"mixer_types": [A, M, M, M], "ffn_types": [D, N, N, N], "mamba_expand": 1}),
    "interleaved-AMAM-e1-mamba-ffn": Design(
        "layers A-M-A-M, Mamba expand 1, FFN after Mamba only (none after attention)",
        "Mamba-2-Hybrid", {"ffn_types": [N, D, N, D]}, preset_global_heads=True),
    "interleaved-MAMA-e1-mamba-ffn": Design(
        "layers M-A-M-A, Mamba expand 1, FFN after Mamba only (none after attention)",
        "Mamba-2-Hybrid", {"mixer_types": [M, A, M, A], "ffn_types": [D, N, D, N],
                           "mamba_expand": 1}),
    "tiny-state-32": Design(
        "`tiny` with a Mamba state of 32 per channel (the preset's 16 doubled)", "Mamba state size",
        {"mamba_d_state": 32}, preset_global_heads=True),
    "tiny-state-64": Design(
        "`tiny` with a Mamba state of 64 per channel", "Mamba state size", {"mamba_d_state": 64},
        preset_global_heads=True),
    "tiny-expand-2": Design(
        "`tiny` with its Mamba layers at expansion 2 (still no FFN after them: the Mamba paper's "
        "own block)", "Mamba expansion", {"mamba_expand": 2}, preset_global_heads=True),
    "tiny-qk-norm": Design(
        "`tiny` with QK-norm in its attention layers: each head's query and key RMS-normalised "
        "before RoPE", "OLMo 2 / Qwen3", {"attention_qk_norm": True}, preset_global_heads=True),
    "tiny-qk-norm-global-both": Design(
        "`tiny` with QK-norm and global heads in both attention layers", "OLMo 2 / Qwen3",
        {"attention_qk_norm": True}),
    "tiny-gated-attention": Design(
        "`tiny` with Qwen3-Next's attention — QK-norm and a sigmoid gate on every head's output — "
        "and global heads in both attention layers", "Qwen3-Next / gated attention",
        {"attention_qk_norm": True, "attention_output_gate": True}),
    "control-AAAA-noffn": Design(
        "control: the same plan with attention in place of Mamba (A-A*-A-A*)", "control",
        {"mixer_types": [A, A, A, A], "ffn_types": [D, N, D, N]}),
}  # fmt: skip


def design_overrides(name: str) -> dict[str, Any]:
    """The settings ``name`` changes in the preset (checked: the config must accept them).

    Every design keeps global heads in all of its attention layers, as when the designs were
    raced (before ``tiny`` kept them in one layer only; a layer plan that moves the attention
    layers could not keep ``tiny``'s placement anyway) — except the shipped preset itself. And
    every design has plain attention unless it says otherwise (:data:`PLAIN_ATTENTION`): the
    designs were raced before ``tiny`` took QK-norm and the output gate, so the saved records
    stay what a rerun measures."""
    design = DESIGNS[name]
    heads = {} if design.preset_global_heads else {"global_attention_layers": None}
    attention = {} if design.preset_attention else PLAIN_ATTENTION
    overrides = {**attention, **heads, **design.overrides}
    race.preset_config().replaced(**overrides)  # raises on a bad design, before any training
    return overrides


def run(
    designs: Sequence[str] = tuple(DESIGNS),
    settings: RaceSettings | None = None,
    *,
    corpus: str = race.CORPUS,
    data_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Race ``designs`` (each as the race's ``hybrid`` entry with its overrides); their record."""
    settings = RaceSettings() if settings is None else settings
    runs = {
        name: (design_overrides(name), {"design": DESIGNS[name].description,
               "lineage": DESIGNS[name].lineage, "overrides": DESIGNS[name].overrides})
        for name in designs
    }  # fmt: skip (checked before any training: design_overrides raises on a bad design)
    return race.run_variants("designs", runs, settings, corpus=corpus, data_dir=data_dir,
                             echo=echo)  # fmt: skip


def save_record(record: dict[str, Any], path: str | Path = RESULTS_FILE) -> list[dict[str, Any]]:
    """As :func:`bench.race.save_record`, in the designs' file."""
    return race.save_record(record, path, benchmark="designs")


def record_markdown(record: dict[str, Any], level: int = 3) -> str:
    """One record as a table sorted by validation bpc, speeds relative to the attention twin."""
    s, entries = record["settings"], record["entries"]
    twin = entries.get("attention", {})
    setting = race.setting_label(s, corpus=record.get("corpus", race.CORPUS), per="design")
    lines = [
        f"{'#' * level} {setting}",
        "",
        f"{record['date']}, {record['machine']}, {race.process_text(s)}, designs trained "
        f"{race.schedule_text(s, len(entries))}.",
        "",
        "| # | design | from | params | steps | tokens/s (× twin) | val bpc (vs twin) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, (name, r) in enumerate(race._ranked(entries), start=1):
        if "error" in r:
            lines.append(f"| – | {name} | failed: {r['error'][:150]} | | | | |")
            continue
        speed = (
            f" ({r['tokens_per_s'] / twin['tokens_per_s']:.2f}×)" if "tokens_per_s" in twin else ""
        )
        gap = f" ({r['val_bpc'] - twin['val_bpc']:+.3f})" if "val_bpc" in twin else ""
        lines.append(
            f"| {rank} | {name}: {r['design']} | {r['lineage']} | {r['params']:,} | {r['steps']:,} "
            f"| {r['tokens_per_s']:,.0f}{speed} | {r['val_bpc']:.3f}{gap} |"
        )
    warning = race.load_warning(record)
    return "\n".join(lines + (["", warning] if warning else []))


def markdown(records: list[dict[str, Any]], level: int = 3) -> str:
    if not records:
        return "No design race saved yet: `python -m bench.designs`."
    return "\n\n".join(record_markdown(r, level) for r in records)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.designs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Race hybrid designs (the tiny preset with a few settings changed) with "
        "bench.race's loop: same recipe, data and wall-clock budget for each; print the table "
        f"and save it to {RESULTS_FILE.relative_to(race.ROOT)}.",
        epilog="designs:\n" + "\n".join(
            f"  {n:<26} {d.description} ({d.lineage})" for n, d in DESIGNS.items()),
    )  # fmt: skip
    d = RaceSettings()
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS),
                        metavar="NAME", help="designs to race (default: all)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=d.seconds,
                        help="training seconds per design (%(default)g)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)g)")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="weights and batches (%(default)s)"
    )
    parser.add_argument("--corpus", choices=list(race.CORPORA), default=race.CORPUS,
                        help="the text to train and validate on (%(default)s; see "
                        "python -m bench.race --help)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {race.QUICK_SECONDS:g} s per design, not saved")  # fmt: skip
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
    quick = race._QUICK if args.quick else {"seconds": args.seconds}
    settings = race.settings_or_exit("python -m bench.designs", **quick, lr=args.lr,
                                     seed=args.seed, **race.worker_settings(args))  # fmt: skip
    record = run(args.designs, settings, corpus=args.corpus)
    print()
    print(record_markdown(record))
    if not (args.quick or args.no_save):
        if race.saved(record, save_record(record, args.results)):
            print(f"\n[designs] saved to {args.results}")
    return 0 if any("error" not in r for r in record["entries"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
