"""``make bench``: run every benchmark, write ``bench/RESULTS.md``, regenerate the README's results.

    python -m bench                        # every benchmark on the default device (CUDA if any)
    python -m bench --only training decode # some of them; the others keep their stored numbers
    python -m bench --readme-only          # regenerate the README section from RESULTS.md
    python -m bench --saved race why_hybrid  # those two sections from their saved JSON files

Every table in RESULTS.md has a CPU and a GPU column group. The numbers behind the tables are kept
at the end of RESULTS.md as JSON inside an HTML comment (invisible when the file is rendered);
a run reads them back, replaces only its own device's entries and writes the file again, so a
run on a GPU keeps the CPU numbers and a CPU run never erases GPU numbers. The README's section
between ``<!-- bench:results:start -->`` and ``<!-- bench:results:end -->`` is generated from
those same numbers.

``bench/why_hybrid.py``, where present, contributes a section through its ``run(quick)`` and
``markdown(results)`` functions. ``bench/race.py`` (the equal wall-clock training race, CPU only:
about 35 minutes at its default 240 s per entry) saves its record to ``bench/results/race.json``;
its section shows every record saved there.

This module runs the benchmarks, stores and merges their numbers per device and assembles
RESULTS.md and the README's section; each benchmark's own tables, readings and headline cells
are rendered next to it (``scan_table`` in ``bench/scan.py``, ``race_table`` in
``bench/race.py``, …) with the shared CPU | GPU helpers of ``bench/tables.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import (
    RESULTS_DIR,
    ablation,
    attention,
    checkpointing,
    decode,
    loss,
    moe,
    race,
    scan,
    training,
)
from .ablation import ablation_table
from .attention import _headline_attention, attention_detail, attention_reading, attention_table
from .checkpointing import checkpointing_table
from .decode import (
    _headline_cache,
    _headline_decode,
    cache_detail,
    cache_reading,
    cache_table,
    decode_detail,
    decode_reading,
    decode_table,
)
from .loss import loss_detail, loss_reading, loss_table
from .moe import moe_detail, moe_reading, moe_table
from .race import _headline_race, race_table
from .scan import _headline_scan, scan_detail, scan_reading, scan_table
from .tables import DEVICES, GROUP, MISSING, Data, PerDevice
from .timing import machine_description
from .training import _headline_training, training_detail, training_reading, training_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
README_PATH = ROOT / "README.md"
SCAN_TABLE_PATH = RESULTS_DIR / "scan_cpu.md"  # the README's Benchmarks names it
DATA_START = "<!-- bench:data"
DATA_PATTERN = re.compile(r"<!-- bench:data[^\n]*\n(.*?)\n-->", re.DOTALL)
README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"


# ==============================================================================================
# Running: each benchmark's run function turns keyword arguments into JSON-able data
# ==============================================================================================
def run_scan(
    device: torch.device, table_path: str | Path | None = SCAN_TABLE_PATH, **kwargs: Any
) -> Data:
    """``bench.scan.run`` at its defaults (or ``kwargs``); on CPU it also writes ``table_path``
    (what ``python -m bench.scan --save`` writes)."""
    results = scan.run(device=device, **kwargs)
    if device.type == "cpu" and table_path is not None:
        shape = {k: kwargs.get(k, v) for k, v in _defaults(scan.measure).items()
                 if k in ("batch_size", "d_inner", "d_state")}  # fmt: skip
        scan.save_table(table_path, scan.format_table(results), device="cpu", **shape)
    return {"measurements": [dataclasses.asdict(m) for m in results]}


def run_attention(device: torch.device, **kwargs: Any) -> Data:
    results = attention.run(device=device, **kwargs)
    return {"measurements": [dataclasses.asdict(m) for m in results]}


def run_moe(device: torch.device, **kwargs: Any) -> Data:
    return {"seconds": moe.run(device=device, **kwargs)}


def run_training(device: torch.device, **kwargs: Any) -> Data:
    peak, results = training.run(device=device, **kwargs)
    return {
        "peak": dataclasses.asdict(peak),
        "runs": [dataclasses.asdict(m) for m in results],
    }


def run_loss(device: torch.device, **kwargs: Any) -> Data:
    return loss.run(device=device, **kwargs)


def run_decode(device: torch.device, **kwargs: Any) -> Data:
    return decode.run(device=device, **kwargs).to_dict()


def _saved_json(path: Path, command: str) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist, so its section cannot be rebuilt from saved results: run "
            f"`{command}` first (or leave out --saved to run it now)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def run_why_hybrid(device: torch.device, quick: bool = False, saved: bool = False) -> Data | None:
    """The other experiments' section, or ``None`` where ``bench/why_hybrid.py`` is absent.

    ``saved``: from the results ``python -m bench.why_hybrid`` saved, instead of a new run.
    """
    module = why_hybrid_module()
    if module is None:
        return None
    if saved:
        results = _saved_json(module.RESULTS_FILE, "python -m bench.why_hybrid")
        return {
            "markdown": module.markdown(results).strip(),
            "date": results["date"],
            "elapsed_s": results["seconds"],
        }
    return {"markdown": module.markdown(module.run(quick=quick)).strip()}


def run_race(device: torch.device, saved: bool = False, **kwargs: Any) -> Data | None:
    """The equal-time race (``bench.race.report_data``): saved, then every saved record.

    ``saved``: every record already in ``bench/results/race.json``, without a new race. It
    measures CPU training (``torch.set_num_threads``), so a run on another device skips it.
    """
    if device.type != "cpu":
        return None
    if saved:
        records = _saved_json(race.RESULTS_FILE, "python -m bench.race")["records"]
        return {
            "records": records,
            "date": max(r["date"] for r in records),
            "elapsed_s": sum(
                e.get("train_seconds", 0.0) for r in records for e in r["entries"].values()
            ),
        }
    return race.report_data(**kwargs)


def run_ablation(
    device: torch.device, saved: bool = True, results_file: str | Path = ablation.RESULTS_FILE
) -> Data | None:
    """Every record ``python -m bench.ablation`` saved (each technique alone, several seeds of
    equal wall-clock training: about 30 minutes, so ``make bench`` shows the saved records
    rather than running it again). CPU only, like the race; ``None`` when nothing is saved."""
    results_file = Path(results_file)
    if device.type != "cpu" or not results_file.exists():
        return None
    records = _saved_json(results_file, "python -m bench.ablation")["records"]
    return {
        "records": records,
        "date": max(r["date"] for r in records),
        "elapsed_s": sum(
            e.get("train_seconds", 0.0) for r in records for e in r["entries"].values()
        ),
    }


def run_checkpointing(
    device: torch.device,
    saved: bool = False,
    results_file: str | Path = checkpointing.RESULTS_FILE,
    **kwargs: Any,
) -> Data:
    """None / branch-selective / whole-layer checkpointing on ``small`` (``bench.checkpointing``);
    a CPU run is saved to ``results_file``, which chapter 12 reads."""
    results_file = Path(results_file)
    if saved:
        record = _saved_json(results_file, "python -m bench.checkpointing")
    else:
        record = checkpointing.run(device=device, **kwargs)
        if device.type == "cpu":
            checkpointing.save(record, results_file)
    return {"record": record, "date": record["date"], "elapsed_s": record["seconds"]}


#: Benchmarks whose section can be rebuilt from the results they saved (``--saved``).
SAVED_RESULTS = ("why_hybrid", "race", "ablation", "checkpointing")


def why_hybrid_present() -> bool:
    """Whether ``bench/why_hybrid.py`` exists (found without importing it)."""
    return importlib.util.find_spec(f"{__package__}.why_hybrid") is not None


def why_hybrid_module():
    """``bench.why_hybrid`` if it exists and has ``run`` and ``markdown``; else ``None``."""
    if not why_hybrid_present():
        return None
    module = importlib.import_module(f"{__package__}.why_hybrid")
    if not (callable(getattr(module, "run", None)) and callable(getattr(module, "markdown", None))):
        return None
    return module


def _defaults(function: Callable) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


RUNNERS: dict[str, Callable[..., Data | None]] = {
    "scan": run_scan,
    "attention": run_attention,
    "moe": run_moe,
    "training": run_training,
    "loss": run_loss,
    "decode": run_decode,
    "why_hybrid": run_why_hybrid,
    "race": run_race,
    "ablation": run_ablation,
    "checkpointing": run_checkpointing,
}


def default_sizes(device: torch.device) -> dict[str, dict[str, Any]]:
    """Keyword arguments per benchmark: the modules' CPU defaults; more repeats on a GPU."""
    if device.type != "cuda":
        return {name: {} for name in RUNNERS}
    return {
        "scan": {"repeats": 10},
        "attention": {"repeats": 10},
        "moe": {"repeats": 10},
        "training": {"matmul_sizes": (4096, 8192), "steps": 10, "warmup_steps": 3},
        "loss": {"repeats": 10},
        "decode": {"repeats": 5},
        "why_hybrid": {},
        "race": {},
        "ablation": {},
        "checkpointing": {"batch_size": 8, "seq_len": 1024},
    }


def device_key(device: torch.device) -> str:
    """``"gpu"`` for CUDA, ``"cpu"`` for the CPU (the two column groups)."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: the results have CPU and CUDA GPU columns only.")
    return "gpu" if device.type == "cuda" else "cpu"


def run_benchmarks(
    names: Iterable[str],
    device: torch.device,
    sizes: dict[str, dict[str, Any]] | None = None,
    runners: dict[str, Callable[..., Data | None]] | None = None,
    *,
    isolate: bool = False,
) -> tuple[dict[str, Data], list[str]]:
    """Run ``names`` in order; returns ``({name: data}, [names that failed])``.

    ``isolate``: each benchmark in a fresh Python process (:func:`run_isolated`), as if run on
    its own — what ``make bench`` does. A benchmark that fails is reported and skipped (its
    stored numbers stay); one that returns ``None`` (``why_hybrid`` when absent, ``race`` on a
    GPU) is left out.
    """
    sizes = default_sizes(device) if sizes is None else sizes
    runners = RUNNERS if runners is None else runners
    results: dict[str, Data] = {}
    failed: list[str] = []
    for name in names:
        started = time.perf_counter()
        print(f"[bench] {name} …", flush=True)
        try:
            if isolate:
                data = run_isolated(name, device, sizes.get(name, {}))
            else:
                data = runners[name](device, **sizes.get(name, {}))
        except Exception:  # one broken benchmark must not cost the others' numbers
            traceback.print_exc()
            failed.append(name)
            continue
        if data is None:
            print(f"[bench] {name}: not available, skipped")
            continue
        data.setdefault("elapsed_s", time.perf_counter() - started)  # saved results keep theirs
        data.setdefault("date", _now())
        if not sizes.get(name, {}).get("saved"):  # a saved result was measured elsewhere
            data.setdefault("machine", machine_description(device))
        results[name] = data
        for section in SECTIONS_BY_BENCHMARK[name]:
            print(section.detail(data) if section.detail else data.get("markdown", ""))
        print(f"[bench] {name}: {data['elapsed_s']:.0f} s", flush=True)
    return results, failed


def run_isolated(name: str, device: torch.device, kwargs: dict[str, Any]) -> Data | None:
    """``RUNNERS[name](device, **kwargs)`` in a fresh Python process; its data comes back as JSON.

    A process that has run other benchmarks is a poor place to measure CPU memory: glibc keeps
    the memory they freed on its heap and hands it out again, so a later pass's resident-memory
    peak hides its real growth (and on any device, warm caches and allocator state carry over).
    ``kwargs`` travel as JSON: tuples arrive as lists, paths as strings.
    """
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "data.json"
        command = [
            sys.executable, "-m", f"{__package__}.report", "--child", name, "--device",
            str(device), "--child-kwargs", json.dumps(kwargs, default=str), "--child-out",
            str(out),
        ]  # fmt: skip
        # cwd: the repository root, where `bench` is importable; the output goes to the terminal
        completed = subprocess.run(command, cwd=ROOT, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"benchmark {name!r} failed (exit code {completed.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))


def _child(name: str, device: str, kwargs: str, out: str) -> int:
    """The fresh process of :func:`run_isolated`: run one benchmark, write its data to ``out``."""
    data = RUNNERS[name](torch.device(device), **json.loads(kwargs))
    Path(out).write_text(json.dumps(data), encoding="utf-8")
    return 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ==============================================================================================
# Storing: the JSON kept at the end of RESULTS.md, merged per device
# ==============================================================================================
def read_data(path: str | Path) -> dict[str, Any]:
    """The stored results (``{"cpu": {...}, "gpu": {...}}``); empty if there are none yet."""
    path = Path(path)
    if not path.exists():
        return {}
    match = DATA_PATTERN.search(path.read_text(encoding="utf-8"))
    if match is None:
        return {}
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"The stored numbers at the end of {path} are not valid JSON ({error}); the file is "
            "generated, so restore it from version control or delete it and run again."
        ) from None


def merge(
    stored: dict[str, Any],
    device: str,
    results: dict[str, Data],
    *,
    machine: str,
    seconds: float,
    date: str,
    rebuilt: Iterable[str] = (),
) -> dict[str, Any]:
    """``stored`` with this run's ``results`` on ``device``; every other entry is kept.
    ``rebuilt``: the names among ``results`` that came from their saved files (``--saved``), not
    from a measurement in this run."""
    merged = json.loads(json.dumps(stored))  # a deep copy
    entry = merged.setdefault(device, {})
    entry.update(machine=machine, date=date, seconds=seconds, ran=sorted(results),
                 rebuilt=sorted(set(rebuilt) & set(results)))  # fmt: skip
    entry.setdefault("benchmarks", {}).update(results)
    return merged


def data_block(data: dict[str, Any]) -> str:
    """The JSON comment that ends RESULTS.md (``-->`` never occurs inside it)."""
    text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)
    # ">" inside a JSON string may be written \u003e: a "-->" there would close the comment.
    text = text.replace("-->", "--\\u003e")
    return (
        f"{DATA_START} (the numbers behind the tables above; read back by the next run)\n"
        f"{text}\n-->"
    )


# ==============================================================================================
# Rendering: one section per benchmark, each rendered by its module (bench/tables.py's helpers)
# ==============================================================================================
def _join_readings(per_device: PerDevice, reading: Callable[[Data], str]) -> str:
    parts = [f"{GROUP[d]}: {reading(per_device[d])}" for d in DEVICES if d in per_device]
    return " ".join(parts) if parts else "Not run yet."


@dataclass(frozen=True)
class Section:
    """One section of RESULTS.md, drawn from one benchmark's data on each device."""

    title: str
    benchmark: str
    intro: str  # what was measured (sizes live in the detail tables)
    table: Callable[[PerDevice], str]  # the CPU | GPU table
    reading: Callable[[Data], str] | None  # one line per device, numbers from the data only
    detail: Callable[[Data], str] | None  # the full table of one device, as its module prints


# ---------------------------------------------------------------------------- why hybrid ---
def why_hybrid_table(per_device: PerDevice) -> str:
    """Each device's text from ``bench.why_hybrid.markdown``, its headings one level down and
    the first one labelled with the device."""
    blocks = [_demoted(per_device[d]["markdown"], GROUP[d]) for d in DEVICES if d in per_device]
    if blocks:
        return "\n\n".join(blocks)
    if not why_hybrid_present():
        return "Not run: `bench/why_hybrid.py` is not in this checkout."
    return "Not run yet."


def _demoted(markdown: str, label: str) -> str:
    lines = [f"#{line}" if line.startswith("#") else line for line in markdown.splitlines()]
    if lines and lines[0].startswith("### "):
        lines[0] = f"### {label}: {lines[0][4:]}"
    else:
        lines.insert(0, f"### {label}\n")
    return "\n".join(lines)


SECTIONS = (
    Section(
        "Selective scan", "scan",
        "Forward + backward of the selective scan (`python -m bench.scan`): speed-ups over the "
        "sequential loop, and the chunked scan's peak memory relative to the loop's. `fused` is "
        "our compiled CPU kernel (`minifusion/csrc/selective_scan.cpp`). "
        "transformers' pure-PyTorch reference runs only at short lengths (its backward pass is "
        "O(L²)); the CUDA kernel only on a GPU with mamba-ssm.",
        scan_table, scan_reading, scan_detail,
    ),
    Section(
        "Attention: full, local and mixed heads", "attention",
        "Forward + backward of one attention layer (`python -m bench.attention`) with all heads "
        "global (full causal), all local (sliding window) or half and half, relative to full.",
        attention_table, attention_reading, attention_detail,
    ),
    Section(
        "Mixture-of-Experts dispatch", "moe",
        "Forward + backward of one MoE layer (`python -m bench.moe`): a per-token loop, the "
        "package's grouped dispatch, and a dense SwiGLU with the same active parameters.",
        moe_table, moe_reading, moe_detail,
    ),
    Section(
        "Training throughput and MFU", "training",
        "Full optimizer steps on random tokens (`python -m bench.training`). MFU = 3 × the "
        "config's forward FLOPs per token × tokens/s ÷ the dense-matmul peak measured in the same "
        "run (forward + backward ≈ 3 forward passes); GFLOP/s counts the same 3 × forward.",
        training_table, training_reading, training_detail,
    ),
    Section(
        "The loss without the logits", "loss",
        "Forward + backward of the output head's cross-entropy (`python -m bench.loss`) at the "
        "presets' shapes, from the full (tokens, vocabulary) logits and chunked "
        "(`minifusion.chunked_loss`: a slice of rows at a time, the logits never held whole); "
        "then whole training steps of `tiny` with each (`train.loss_chunk_rows`). The two take "
        "turns in one run.",
        loss_table, loss_reading, loss_detail,
    ),
    Section(
        "Decode speed", "decode",
        "Greedy decoding at batch 1 and 8 after a random prompt (`python -m bench.decode`), "
        "through `minifusion.inference.measure_decode`: the tiny hybrid, its full-attention twin "
        "(`full_attention_config`) and transformers' `LlamaForCausalLM` of the same sizes with its "
        "SwiGLU width solved to the hybrid's active parameter count; ratios to Llama, and the "
        "prefill time of a long prompt.",
        decode_table, decode_reading, decode_detail,
    ),
    Section(
        "Cache memory vs context length", "decode",
        "Bytes each model's cache holds after that many tokens (batch 1, fp32), read off the cache "
        "tensors: MiniFusion's `HybridCache` and transformers' `DynamicCache`. The last column "
        "says whether every measurement equals the size a formula from the config predicts.",
        cache_table, cache_reading, cache_detail,
    ),
    Section(
        "Why hybrid?", "why_hybrid",
        "Experiments from `bench/why_hybrid.py`.",
        why_hybrid_table, None, None,
    ),
    Section(
        "Equal wall-clock training race", "race",
        "Language models of about one size (`python -m bench.race`): the `tiny` hybrid as "
        "shipped, its attention-only and Mamba-only twins, and transformers' Llama, GPT-2, "
        "Falcon-H1 and Mamba-2 sized to the attention twin's parameter count, each trained in a "
        "fresh process with one recipe on the same Shakespeare batches for the same seconds, "
        "then scored on two held-out works in bits per character (lower is better). One table "
        "per saved setting (`bench/results/race.json`).",
        race_table, None, None,
    ),
    Section(
        "Ablation: each technique alone", "ablation",
        "The `tiny` model as shipped against the same model with one technique switched on "
        "(`python -m bench.ablation`): SRTE, XPos, LayerScale, DropPath, DeepNorm, parallel "
        "residual, and `torch.compile` — each trained by the race's loop for the same seconds in "
        "several seeds, scored in bits per character on the held-out works; each variant is "
        "paired with the default run of the same seed.",
        ablation_table, None, None,
    ),
    Section(
        "Activation checkpointing: none, branches, layers", "checkpointing",
        "One training step of the `small` preset (`python -m bench.checkpointing`) with nothing "
        "recomputed, with only the attention and Mamba branches recomputed in backward "
        "(FusionTree's branch-selective checkpointing) and with whole layers recomputed: peak "
        "memory over the weights (the device's, and the exact peak of the tensors the step "
        "creates), and the step's time, relative to none.",
        checkpointing_table, None, None,
    ),
)  # fmt: skip
SECTIONS_BY_BENCHMARK: dict[str, list[Section]] = {}
for _section in SECTIONS:
    SECTIONS_BY_BENCHMARK.setdefault(_section.benchmark, []).append(_section)


def render_section(section: Section, stored: dict[str, Any]) -> str:
    """Title, what was measured, the CPU | GPU table, the reading and each device's full table."""
    per_device = {
        d: stored[d]["benchmarks"][section.benchmark]
        for d in DEVICES
        if section.benchmark in stored.get(d, {}).get("benchmarks", {})
    }
    parts = [f"## {section.title}", section.intro, _measured_line(per_device)]
    parts.append(section.table(per_device))
    if section.reading is not None:
        parts.append(_join_readings(per_device, section.reading))
    for device in DEVICES:
        if section.detail is not None and device in per_device:
            parts.append(
                f"<details><summary>{GROUP[device]}: the full table</summary>\n\n"
                f"{section.detail(per_device[device])}\n\n</details>"
            )
    return "\n\n".join(parts)


def _measured_line(per_device: PerDevice) -> str:
    """When and (for results stored with it) on which machine each device's numbers were taken:
    the sections of one file can come from different runs on different hosts."""
    parts = []
    for d in DEVICES:
        if d not in per_device:
            parts.append(f"{GROUP[d]} not yet")
            continue
        data = per_device[d]
        where = f", {data['machine']}" if data.get("machine") else ""
        parts.append(f"{GROUP[d]} {data['date']} ({data['elapsed_s']:.0f} s{where})")
    return "_Measured: " + "; ".join(parts) + "._"


def render_results(stored: dict[str, Any]) -> str:
    """The whole RESULTS.md: header, one section per benchmark, the stored numbers."""
    lines = [
        "# MiniFusion benchmark results",
        "",
        "Written by `make bench` (`python -m bench`) — do not edit by hand: every number below "
        "comes from a run, and the README's results section is generated from this file. Each "
        "table has a CPU and a GPU column group; a run fills its own device's columns and keeps "
        "the other's. Times are wall-clock on a machine that may have been shared with other "
        "work, so ratios are steadier than absolute numbers.",
        "",
        "| device | machine | last run | benchmarks in it | run time |",
        "|---|---|---|---|---|",
    ]
    for device in DEVICES:
        entry = stored.get(device)
        if entry is None:
            lines.append(f"| {GROUP[device]} | not run yet | {MISSING} | {MISSING} | {MISSING} |")
        else:
            lines.append(
                f"| {GROUP[device]} | {entry['machine']} | {entry['date']} "
                f"| {ran_cell(entry)} | {format_duration(entry['seconds'])} |"
            )
    body = [render_section(section, stored) for section in SECTIONS]
    return "\n".join(lines) + "\n\n" + "\n\n".join(body) + "\n\n" + data_block(stored) + "\n"


def ran_cell(entry: dict[str, Any]) -> str:
    """The benchmarks of a device's last run; those rebuilt from their saved results are marked
    (the run time is then the rebuild's, not the measurement's)."""
    rebuilt = set(entry.get("rebuilt", ()))
    return ", ".join(
        f"{name} (rebuilt from its saved results)" if name in rebuilt else name
        for name in entry["ran"]
    )


def format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


# ==============================================================================================
# The README's section: headline ratios, generated from RESULTS.md
# ==============================================================================================
def headline_rows(stored: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """``[(what, {device: cell})]``: the headline numbers, one row per measurement."""
    headlines = list(HEADLINES)
    for preset in _training_presets(stored):
        headlines.insert(
            len(headlines) - 4,  # before decode, cache and the two races
            (f"Training `{preset}`: tokens/s (MFU vs the measured matmul peak)", "training",
             lambda d, p=preset: _headline_training(d, p)),
        )  # fmt: skip
    rows = []
    for what, benchmark, cell in headlines:
        values = {}
        for device in DEVICES:
            data = stored.get(device, {}).get("benchmarks", {}).get(benchmark)
            value = cell(data) if data is not None else None
            values[device] = MISSING if value is None else value
        rows.append((what, values))
    return rows


def _training_presets(stored: dict[str, Any]) -> list[str]:
    presets = []
    for device in DEVICES:
        data = stored.get(device, {}).get("benchmarks", {}).get("training")
        presets += [m["preset"] for m in data["runs"]] if data else []
    return list(dict.fromkeys(presets))


_RACE = race.RaceSettings()  # the race's default settings: the record its headline reads
# (what, benchmark, cell from that benchmark's data); training rows are added per preset.
HEADLINES: tuple[tuple[str, str, Callable[[Data], str | None]], ...] = (
    ("Selective scan: fastest CPU scan vs sequential loop, speed-up at the longest L", "scan",
     _headline_scan),
    ("Attention: all-local vs full heads, time at the longest T", "attention",
     lambda d: _headline_attention(d, "seconds")),
    ("Attention: all-local vs full heads, peak memory at the longest T", "attention",
     lambda d: _headline_attention(d, "peak_bytes")),
    ("Attention: all-local vs full heads, exact tensor bytes at the peak, longest T",
     "attention", lambda d: _headline_attention(d, "tensor_peak_bytes")),
    ("MoE: grouped dispatch vs dense SwiGLU (same active parameters), time", "moe",
     lambda d: f"{d['seconds']['grouped'] / d['seconds']['dense']:.2f}×"),
    ("Decode: hybrid vs transformers Llama, tokens/s at the longest context", "decode",
     _headline_decode),
    ("Cache: hybrid vs transformers Llama, bytes at the longest context", "decode",
     _headline_cache),
    (f"Race ({race.setting_label(_RACE.to_dict(), ', ')}): hybrid's val bpc vs the best other "
     "entry", "race", _headline_race),
    (f"Race ({race.setting_label(_RACE.to_dict(), ', ', corpus='python-code')}): hybrid's val "
     "bpc vs the best other entry", "race", lambda d: _headline_race(d, "python-code")),
)  # fmt: skip


def readme_section(stored: dict[str, Any], results_link: str = "bench/RESULTS.md") -> str:
    """The generated text that goes between the README's markers."""
    machines = [
        f"{GROUP[d]}: {stored[d]['machine']}, {stored[d]['date']}" for d in DEVICES if d in stored
    ]
    lines = [
        "Headline numbers of the last `make bench` (ratios are steadier than absolute times; "
        f"every table, size and reading is in [`{results_link}`]({results_link})). "
        + ("Machines — " + "; ".join(machines) + "." if machines else "Not run yet."),
        "",
        "| measurement | CPU | GPU |",
        "|---|---|---|",
    ]
    for what, values in headline_rows(stored):
        lines.append(f"| {what} | {values['cpu']} | {values['gpu']} |")
    return "\n".join(lines)


def update_readme(readme: str | Path, results: str | Path) -> bool:
    """Regenerate the text between the README's markers from RESULTS.md; ``True`` if it changed.

    Only the marked region is rewritten; running it again with the same RESULTS.md changes
    nothing.
    """
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(
            f"{readme} has no results markers: add a line {README_START} and, below it, a line "
            f"{README_END} where the benchmark summary should go."
        )
    new = (
        text[: start + len(README_START)]
        + "\n"
        + readme_section(read_data(results))
        + "\n"
        + text[end:]
    )
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


# ==============================================================================================
# The command
# ==============================================================================================
def write_results(path: str | Path, stored: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render_results(stored), encoding="utf-8")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_and_write(
    device_name: str,
    only: list[str] | None,
    results_path: str | Path,
    *,
    isolate: bool = True,
    saved: Iterable[str] = (),
) -> list[str]:
    """Run the benchmarks, merge them into ``results_path``; returns the names that failed.

    ``saved``: names from :data:`SAVED_RESULTS` whose sections come from their saved results.
    """
    device = resolve_device(device_name)
    key = device_key(device)  # refuses a device without a column group before any work
    previous = read_data(results_path)  # and a broken results file, too
    sizes = default_sizes(device)
    for name in saved:
        sizes[name] = {**sizes.get(name, {}), "saved": True}
    started = time.perf_counter()
    results, failed = run_benchmarks(only or list(RUNNERS), device, sizes, isolate=isolate)
    seconds = time.perf_counter() - started
    stored = merge(previous, key, results, machine=machine_description(device), seconds=seconds,
                   date=_now(), rebuilt=saved)  # fmt: skip
    write_results(results_path, stored)
    print(f"[bench] wrote {results_path} in {format_duration(seconds)}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)} (their earlier numbers were kept)")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--only", nargs="+", choices=list(RUNNERS), help="run only these")
    parser.add_argument(
        "--saved",
        nargs="+",
        default=[],
        choices=SAVED_RESULTS,
        help="rebuild these sections from their saved results (bench/results/race.json, "
        "why_hybrid.json) instead of running them again (the race takes about 35 minutes)",
    )
    parser.add_argument("--results", default=str(RESULTS_PATH))
    parser.add_argument("--readme", default=str(README_PATH))
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate the README")
    parser.add_argument(
        "--in-process", action="store_true", help="no fresh process per benchmark (debugging)"
    )
    for hidden in ("--child", "--child-kwargs", "--child-out"):  # run_isolated's fresh process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.device, args.child_kwargs, args.child_out)
    if args.readme_only and args.no_readme:
        parser.error("--readme-only with --no-readme leaves nothing to do; drop one of them.")
    if not args.no_readme and not Path(args.readme).is_file():
        parser.error(f"--readme {args.readme} does not exist; its results section is where the "
                     "tables go (the repository's README.md by default).")  # fmt: skip
    failed = []
    if not args.readme_only:
        failed = run_and_write(
            args.device, args.only, args.results, isolate=not args.in_process, saved=args.saved
        )
    if not args.no_readme:
        changed = update_readme(args.readme, args.results)
        print(f"[bench] README results section {'updated' if changed else 'unchanged'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
