"""bench/report.py: RESULTS.md with every section, the CPU/GPU merge, the README's marked region.

Fake measurements (the benchmarks' own result types with made-up numbers) test the writing;
one run at tiny sizes tests that the real benchmarks feed it. No test looks at a speed.
"""

import dataclasses

import pytest
import torch

from bench import attention, decode, race, report, scan, training
from bench.timing import machine_description
from tests.conftest import write_words_corpus

README = """# Project

Intro text that must stay exactly as it is.

## Results

<!-- bench:results:start -->
old generated text
<!-- bench:results:end -->

## After

More text that must stay.
"""


def fake_runners(scale: float = 1.0, why_hybrid: str | None = "| task | score |\n|---|---|"):
    """Runners returning the benchmarks' data shapes with made-up numbers (``scale`` × times)."""

    def fake_scan(device, **kwargs):
        rows = [
            scan.Measurement(s, n, scale * t * n / 256, 1000 * n)
            for n in (256, 512)
            for s, t in (("sequential", 0.4), ("chunked", 0.1))
        ]
        return {"measurements": [dataclasses.asdict(m) for m in rows]}

    def fake_attention(device, **kwargs):
        rows = [
            attention.Measurement(p, n, scale * t, b)
            for n in (512, 1024)
            for p, t, b in (("full", 0.2, 4000), ("local", 0.1, 2000), ("mixed", 0.15, None))
        ]
        return {"measurements": [dataclasses.asdict(m) for m in rows]}

    def fake_moe(device, **kwargs):
        return {"seconds": {"loop": scale * 2.0, "grouped": scale * 0.06, "dense": scale * 0.04}}

    def fake_training(device, **kwargs):
        peak = training.MatmulPeak(2048, "float32", 0.2, 8.6e10)
        runs = [
            training.TrainingMeasurement("tiny", 1_900_000, 16, 256, "float32", 5, scale, 1.5e7)
        ]
        return {"peak": dataclasses.asdict(peak), "runs": [dataclasses.asdict(m) for m in runs]}

    def fake_loss(device, **kwargs):
        head = {"shape": "tiny", "tokens": 4096, "hidden": 128, "vocab": 4096, "chunk_rows": 128,
                "full_seconds": scale * 0.2, "chunked_seconds": scale * 0.1,
                "full_peak_bytes": 200 * 2**20, "chunked_peak_bytes": 20 * 2**20}  # fmt: skip
        training_step = {"preset": "tiny", "batch_size": 16, "seq_len": 256, "chunk_rows": 128,
                         "full_seconds": scale * 0.3, "chunked_seconds": scale * 0.24}  # fmt: skip
        return {"heads": [head], "training": training_step}

    def fake_decode(device, **kwargs):
        speeds = [
            decode.DecodeSpeed(m, c, 32, 1, scale * t, 32 / (scale * t))
            for c in (256, 2048)
            for m, t in (("hybrid", 0.5), ("full_attention", 0.4), ("llama", 0.3))
        ]
        caches = [
            decode.CacheSize(m, n, b * n, b * n)
            for n in (256, 8192)
            for m, b in (("hybrid", 300), ("full_attention", 512), ("llama", 512))
        ]
        params = {"hybrid": 1_869_440, "full_attention": 1_311_872, "llama": 1_311_872}
        return decode.DecodeResults("tiny", params, speeds, caches).to_dict()

    def fake_why_hybrid(device, **kwargs):
        return None if why_hybrid is None else {"markdown": why_hybrid}

    def fake_race(device, **kwargs):
        entries = {
            name: {"model": name, "sizes": "", "note": "", "params": params, "steps": 100,
                   "tokens": 204_800, "train_seconds": 240.0, "tokens_per_s": tok_s / scale,
                   "train_loss": 4.0, "val_loss": 4.2, "val_bpc": bpc}
            for name, params, tok_s, bpc in (("hybrid", 1_869_440, 3000, 2.25),
                                             ("attention", 1_311_872, 9000, 2.5))
        }  # fmt: skip
        settings = race.RaceSettings().to_dict()
        return {"records": [{"settings": settings, "date": "2000-01-01 00:00 UTC",
                             "machine": "m", "validation": {"works": ["a", "b"], "blocks": "all"},
                             "design": race.current_design(), "entries": entries}]}  # fmt: skip

    def fake_ablation(device, **kwargs):
        def record(seed, default_bpc, srte_bpc):
            entries = {
                name: {"params": 1_034_880, "steps": 100, "train_seconds": 60.0, "tokens": 610_000,
                       "tokens_per_s": tok_s / scale, "val_bpc": bpc, "warm_up_seconds": 1.0}
                for name, tok_s, bpc in (("default", 9000, default_bpc), ("srte", 8900, srte_bpc))
            }  # fmt: skip
            settings = race.RaceSettings(seconds=60.0, seed=seed).to_dict()
            return {"settings": settings, "date": "2000-01-01 00:00 UTC", "machine": "m",
                    "entries": entries}  # fmt: skip

        return {"records": [record(0, 2.70, 2.68), record(1, 2.72, 2.71)]}

    def fake_checkpointing(device, **kwargs):
        record = {"settings": {"preset": "small", "batch_size": 2, "seq_len": 512},
                  "machine": "m", "date": "2000-01-01 00:00 UTC", "seconds": 10.0,
                  "results": [{"mode": m, "peak_bytes": b, "seconds": scale * t,
                               "tensor_peak_bytes": exact}
                              for m, b, t, exact in (("none", 400 * 2**20, 2.0, 300 * 2**20),
                                                     ("branches", 250 * 2**20, 2.4, 180 * 2**20),
                                                     ("layers", 100 * 2**20, 2.8, 60 * 2**20))]}  # fmt: skip
        return {"record": record}

    return {
        "scan": fake_scan, "attention": fake_attention, "moe": fake_moe,
        "training": fake_training, "loss": fake_loss, "decode": fake_decode,
        "why_hybrid": fake_why_hybrid,
        "race": fake_race, "ablation": fake_ablation, "checkpointing": fake_checkpointing,
    }  # fmt: skip


def run_fake(tmp_path, device: str, scale: float = 1.0, **kwargs):
    """One fake run on ``device`` merged into tmp_path/RESULTS.md; returns the stored data."""
    results, failed = report.run_benchmarks(
        list(report.RUNNERS), torch.device("cpu"), sizes={}, runners=fake_runners(scale, **kwargs)
    )
    assert not failed
    path = tmp_path / "RESULTS.md"
    stored = report.merge(
        report.read_data(path), device, results, machine=f"{device} machine", seconds=1.0,
        date="2000-01-01 00:00 UTC",
    )  # fmt: skip
    report.write_results(path, stored)
    return stored


def test_header_marks_sections_rebuilt_from_their_saved_results(tmp_path):
    stored = run_fake(tmp_path, "cpu")

    def rerun(name, date, **kwargs):  # a later run of one benchmark, merged into the file
        results = {name: stored["cpu"]["benchmarks"][name]}
        merged = report.merge(stored, "cpu", results, machine="m", seconds=5.0, date=date, **kwargs)
        return merged, report.render_results(merged).split("\n## ")[0]  # its header

    merged, header = rerun("checkpointing", "2000-01-02", rebuilt=["checkpointing", "race"])
    assert merged["cpu"]["rebuilt"] == ["checkpointing"]  # only what this run produced
    assert "| 2000-01-02 | checkpointing (rebuilt from its saved results) | 5 s |" in header
    merged, header = rerun("moe", "2000-01-03")
    assert merged["cpu"]["rebuilt"] == [] and "| 2000-01-03 | moe | 5 s |" in header


def test_results_have_every_section_and_read_back(tmp_path):
    stored = run_fake(tmp_path, "cpu")
    text = (tmp_path / "RESULTS.md").read_text()
    for section in report.SECTIONS:
        assert f"\n## {section.title}\n" in text
    assert "| CPU | cpu machine | 2000-01-01 00:00 UTC |" in text
    assert "| GPU | not run yet |" in text
    assert "| task | score |" in text  # the why-hybrid section's own markdown
    assert "| 1 | hybrid | hybrid |  | 1,869,440 (+42.5%) |" in text  # the race's table
    assert "2.250 vs 2.500 bpc (-0.250) at 0.33× the twin's tokens/s" in text
    # the ablation pairs each seed with its default: Δ = (−0.02, −0.01) → −0.015 ± 0.007
    assert "| srte: SRTE, sinusoidal, on the Mamba branch | 10 | 1,034,880 | 2.695 ± 0.021 " \
        "| -0.015 ± 0.007 | 2 of 2 | 8,900 (0.99×) | 1.0 | 10,000 |" in text
    assert "| branches | 250.0 | 0.62 | 180.0 | 0.60 | 2.40 | 1.20 |" in text  # checkpointing
    assert "| head of tiny | 0.50 | 0.10 | — | — |" in text  # the loss: chunked / full
    assert "a whole training step of `tiny` runs 1.25× as fast with it" in text
    assert report.read_data(tmp_path / "RESULTS.md") == stored
    # numbers in the tables and readings come from the data: 0.4 / 0.1 = 4.0× at L = 512
    assert "at L = 512 the chunked scan is 4.0× as fast as the sequential loop" in text
    assert "| 512 | 4.0× | — | — | — | 1.00 | — | — | — | — | — |" in text
    # a second render of the same data is byte-identical (deterministic layout)
    report.write_results(tmp_path / "again.md", stored)
    assert (tmp_path / "again.md").read_text() == text


def test_gpu_run_keeps_cpu_numbers_and_cpu_run_keeps_gpu_numbers(tmp_path):
    run_fake(tmp_path, "cpu", scale=1.0)
    cpu_line = _moe_row(tmp_path)
    run_fake(tmp_path, "gpu", scale=0.01)
    both = _moe_row(tmp_path)
    assert both.startswith(cpu_line.split("| — |")[0])  # the CPU cells are unchanged
    assert "| 0.6 | 1.50 |" in both  # the GPU cells: 0.06 × 0.01 s = 0.6 ms
    stored = run_fake(tmp_path, "cpu", scale=2.0)  # a new CPU run …
    assert stored["gpu"]["benchmarks"]["moe"]["seconds"]["grouped"] == pytest.approx(0.0006)
    assert _moe_row(tmp_path).endswith("| 0.6 | 1.50 |")  # … keeps the GPU cells
    assert "| 120.0 | 1.50 |" in _moe_row(tmp_path)  # and has its own


def _moe_row(tmp_path) -> str:
    text = (tmp_path / "RESULTS.md").read_text()
    return next(line for line in text.splitlines() if line.startswith("| grouped dispatch |"))


def test_failed_benchmark_keeps_its_earlier_numbers(tmp_path, capsys):
    run_fake(tmp_path, "cpu")
    runners = fake_runners(scale=3.0)
    runners["moe"] = lambda device, **kwargs: 1 / 0
    results, failed = report.run_benchmarks(["moe", "scan"], torch.device("cpu"), {}, runners)
    assert failed == ["moe"] and set(results) == {"scan"}
    stored = report.merge(report.read_data(tmp_path / "RESULTS.md"), "cpu", results,
                          machine="m", seconds=1.0, date="d")  # fmt: skip
    assert stored["cpu"]["benchmarks"]["moe"]["seconds"]["grouped"] == pytest.approx(0.06)
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_comment_closer_in_a_section_cannot_break_the_data(tmp_path):
    stored = run_fake(tmp_path, "cpu", why_hybrid="a --> b")
    assert report.read_data(tmp_path / "RESULTS.md") == stored


def test_readme_region_only_and_idempotent(tmp_path):
    run_fake(tmp_path, "cpu")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.update_readme(readme, tmp_path / "RESULTS.md") is True
    text = readme.read_text()
    before, _, rest = README.partition(report.README_START)
    _, _, after = rest.partition(report.README_END)
    assert text.startswith(before + report.README_START + "\n") and text.endswith(
        report.README_END + after
    )
    assert "old generated text" not in text and "bench/RESULTS.md" in text
    assert (
        "| MoE: grouped dispatch vs dense SwiGLU (same active parameters), time | 1.50× | — |"
        in text
    )
    # the race's default record: the hybrid (2.25) against the best other entry (attention, 2.5)
    assert "hybrid's val bpc vs the best other entry | 2.250 vs 2.500 (attention) | — |" in text
    assert report.update_readme(readme, tmp_path / "RESULTS.md") is False
    assert readme.read_text() == text
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:results:start"):
        report.update_readme(readme, tmp_path / "RESULTS.md")


def test_broken_results_file_and_unknown_device_stop_before_any_run(tmp_path):
    broken = tmp_path / "RESULTS.md"
    broken.write_text("<!-- bench:data\n{not json\n-->\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.main(["--device", "cpu", "--results", str(broken), "--no-readme"])
    with pytest.raises(ValueError, match="CPU and CUDA GPU columns only"):
        report.main(["--device", "meta", "--results", str(tmp_path / "new.md"), "--no-readme"])


def test_missing_why_hybrid_is_tolerated(tmp_path):
    stored = run_fake(tmp_path, "cpu", why_hybrid=None)
    assert "why_hybrid" not in stored["cpu"]["benchmarks"]
    assert "\n## Why hybrid?\n" in (tmp_path / "RESULTS.md").read_text()


def tiny_sizes(tmp_path):
    return {
        "scan": {"seq_lens": (8,), "batch_size": 1, "d_inner": 4, "d_state": 2, "repeats": 1,
                 "reference_max_len": 8, "isolate_memory": False,
                 "table_path": tmp_path / "scan.md"},
        "attention": {"seq_lens": (32,), "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                      "window": 8, "repeats": 1},
        "moe": {"tokens": 16, "hidden_size": 16, "num_experts": 4, "expert_size": 8,
                "repeats": 1},
        "training": {"shapes": {"tiny": (1, 16)}, "matmul_sizes": (32,), "steps": 1,
                     "warmup_steps": 0},
        "loss": {"shapes": (("toy", 64, 8, 32),), "training_shape": ("tiny", 1, 16),
                 "repeats": 1},
        "decode": {"contexts": (4,), "cache_lengths": (8,), "new_tokens": 1, "repeats": 1},
        "why_hybrid": {"quick": True},
        "race": {"quick": True, "models": ["attention"], "seconds": 0.5, "batch_size": 2,
                 "seq_len": 16, "eval_blocks": 2, "data_dir": tmp_path / "race_data",
                 "corpus": str(write_words_corpus(tmp_path / "race_corpus") / "*.txt")},
        "ablation": {"results_file": tmp_path / "no_ablation_saved.json"},  # none: skipped
        "checkpointing": {"preset": "tiny", "batch_size": 1, "seq_len": 16, "repeats": 1,
                          "memory_runs": 1, "results_file": tmp_path / "checkpointing.json"},
    }  # fmt: skip


@pytest.mark.slow
def test_real_benchmarks_at_tiny_sizes_through_the_command(tmp_path, monkeypatch):
    sizes = tiny_sizes(tmp_path)
    monkeypatch.setattr(report, "default_sizes", lambda device: sizes)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = tmp_path / "RESULTS.md"
    files = ["--results", str(results), "--readme", str(readme)]
    assert report.main(["--device", "cpu", "--in-process", *files]) == 0
    stored = report.read_data(results)
    expected = {"scan", "attention", "moe", "training", "loss", "decode", "race",
                "checkpointing"}
    if report.why_hybrid_module() is not None:  # its quick run: seconds
        expected.add("why_hybrid")
        assert "### CPU: " in results.read_text()
    assert set(stored["cpu"]["benchmarks"]) == expected
    assert "| 1 | attention | MiniFusion `tiny`, attention only |" in results.read_text()
    assert "| 8 |" in (tmp_path / "scan.md").read_text()
    assert "`tiny`, batch 1 × 16 tokens" in results.read_text()  # checkpointing, saved here
    assert (tmp_path / "checkpointing.json").exists()
    assert "Training `tiny`" in readme.read_text()
    # make bench's way: each benchmark in a fresh process (sizes travel as JSON)
    assert report.main(["--device", "cpu", "--only", "moe", "training", *files]) == 0
    again = report.read_data(results)
    assert set(again["cpu"]["ran"]) == {"moe", "training"}
    assert again["cpu"]["benchmarks"]["scan"] == stored["cpu"]["benchmarks"]["scan"]
    assert again["cpu"]["benchmarks"]["training"]["runs"][0]["seq_len"] == 16
    assert report.main(["--readme-only", *files]) == 0


def test_readme_flags_that_cannot_work_are_refused(tmp_path, capsys):
    missing = tmp_path / "missing.md"
    for flags, message in ((["--readme-only", "--no-readme"], "leaves nothing to do"),
                           (["--readme-only", "--readme", str(missing)], "does not exist")):  # fmt: skip
        with pytest.raises(SystemExit):
            report.main(flags)
        assert message in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.gpu
def test_cuda_run_fills_the_gpu_columns(tmp_path, monkeypatch):
    run_fake(tmp_path, "cpu")
    monkeypatch.setattr(report, "default_sizes", lambda device: tiny_sizes(tmp_path))
    monkeypatch.setitem(report.RUNNERS, "why_hybrid", lambda device, **kwargs: None)
    results = tmp_path / "RESULTS.md"
    assert report.main(["--device", "cuda", "--results", str(results), "--no-readme"]) == 0
    stored = report.read_data(results)
    assert stored["cpu"]["machine"] == "cpu machine" and "training" in stored["gpu"]["benchmarks"]


def test_saved_sections_come_from_their_files_without_a_new_run(tmp_path, monkeypatch):
    monkeypatch.setattr(race, "RESULTS_FILE", tmp_path / "race.json")
    with pytest.raises(FileNotFoundError, match="run `python -m bench.race` first"):
        report.run_race(torch.device("cpu"), saved=True)
    entries = {"attention": {"val_bpc": 2.0, "train_seconds": 240.0}}
    settings = race.RaceSettings().to_dict()
    race.save_record({"settings": settings, "date": "2000-01-02 03:04 UTC", "entries": entries},
                     tmp_path / "race.json")  # fmt: skip
    monkeypatch.setattr(race, "report_data", lambda **kwargs: pytest.fail("the race ran again"))
    data = report.run_race(torch.device("cpu"), saved=True)
    assert data["records"][0]["entries"] == entries
    assert data["date"] == "2000-01-02 03:04 UTC" and data["elapsed_s"] == 240.0
    # run_benchmarks keeps the saved date and duration instead of stamping its own
    results, failed = report.run_benchmarks(
        ["race"], torch.device("cpu"), {"race": {"saved": True}}, report.RUNNERS
    )
    assert failed == [] and results["race"]["date"] == "2000-01-02 03:04 UTC"
    assert report.run_race(torch.device("cuda"), saved=True) is None  # a CPU-only race


def test_each_measured_section_names_the_machine_it_ran_on(tmp_path):
    """Sections of one RESULTS.md come from different runs, possibly on different hosts: each
    measured one records its machine, a section rebuilt from saved results does not claim one."""
    results, failed = report.run_benchmarks(
        ["moe", "race"], torch.device("cpu"), sizes={"race": {"saved": True}},
        runners=fake_runners(1.0),
    )  # fmt: skip
    assert not failed
    here = machine_description(torch.device("cpu"))
    assert results["moe"]["machine"] == here and "machine" not in results["race"]
    stored = report.merge({}, "cpu", results, machine="run machine", seconds=1.0, date="d")
    text = report.render_results(stored)
    moe_section = text.split("\n## Mixture-of-Experts dispatch\n")[1].split("\n## ")[0]
    assert f"s, {here}); GPU not yet._" in moe_section
