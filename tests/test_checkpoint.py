"""Checkpoints: atomic writes, safe and verified loading, rotation, RNG capture, HF export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from minifusion.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    capture_rng_state,
    check_compatible,
    export_pretrained,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from minifusion.model import MiniFusionForCausalLM
from tests.test_model import small_config


def _state(step: int) -> dict:
    return {"weights": torch.full((3, 4), float(step)), "step": step, "note": "x", "rng": {}}


def test_round_trip_and_meta(tmp_path):
    path = save_checkpoint(tmp_path, _state(7), {"step": 7, "tokens_seen": 70})
    assert path.name == "step_000007"
    state, meta = load_checkpoint(path)
    assert torch.equal(state["weights"], torch.full((3, 4), 7.0)) and state["note"] == "x"
    assert meta["tokens_seen"] == 70 and meta["state_bytes"] == (path / "state.pt").stat().st_size
    assert len(meta["state_sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_keep_last_rotation_and_latest(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, _state(step), {"step": step}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_000003",
        "step_000010",
        "step_000011",
    ]
    assert latest_checkpoint(tmp_path).name == "step_000011"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_saving_the_same_step_twice_keeps_the_first(tmp_path):
    first = save_checkpoint(tmp_path, _state(5), {"step": 5})
    again = save_checkpoint(tmp_path, {"weights": torch.zeros(1)}, {"step": 5})
    assert first == again
    assert torch.equal(load_checkpoint(first)[0]["weights"], torch.full((3, 4), 5.0))


def test_truncated_state_names_the_problem_and_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(1), {"step": 1})
    latest = save_checkpoint(tmp_path, _state(2), {"step": 2})
    data = (latest / "state.pt").read_bytes()
    (latest / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated") as error:
        load_checkpoint(latest)
    assert "step_000001" in str(error.value) and str(latest) in str(error.value)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), {"step": 1})
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_missing_or_damaged_meta(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), {"step": 1})
    (path / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptCheckpointError, match="damaged"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="not a complete"):
        load_checkpoint(path)


class _Exploit:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_checkpoint(tmp_path / "ckpt", {"payload": _Exploit()}, {"step": 1})
    with pytest.raises(CorruptCheckpointError, match="cannot be read safely"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    path = save_checkpoint(tmp_path, {"rng": state}, {"step": 1})
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    restore_rng_state(load_checkpoint(path)[0]["rng"])
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert expected[0] == again[0]
    assert np.array_equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


def test_check_compatible_names_fields_and_hashes():
    config = small_config("hybrid-dense").to_dict()
    meta = {"step": 3, "model_config": config, "tokenizer_hash": "aaaa"}
    check_compatible(
        meta, model_config=dict(config, transformers_version="9"), tokenizer_hash="aaaa"
    )
    with pytest.raises(CheckpointMismatchError, match=r"hidden_size: checkpoint 32 vs run 64"):
        check_compatible(meta, model_config=dict(config, hidden_size=64), tokenizer_hash="aaaa")
    with pytest.raises(CheckpointMismatchError, match=r"tokenizer aaaa.*tokenizer bbbb"):
        check_compatible(meta, model_config=config, tokenizer_hash="bbbb")


def test_export_loads_with_auto_class_and_gives_same_logits(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("everything", vocab_size=len(small_tokenizer)))
    info = export_pretrained(model, small_tokenizer, tmp_path / "model")
    assert "model.safetensors" in info.files and "config.json" in info.files
    assert not any(name.endswith(".bin") for name in info.files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, len(small_tokenizer), (2, 9))
    model.eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    # A second export replaces the folder whole.
    export_pretrained(model, small_tokenizer, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # Anything else there is refused, not replaced: a folder of other files, a file.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me too")
    for target, reason in (("notes", "not a model export"), ("a_file", "is a file")):
        with pytest.raises(FileExistsError, match=reason):
            export_pretrained(model, small_tokenizer, tmp_path / target)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "a_file").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model", "notes"]


_KILLED_WRITER = textwrap.dedent(
    """
    import io, pathlib, sys, time, torch
    from minifusion import checkpoint

    folder = pathlib.Path(sys.argv[1])
    checkpoint.save_checkpoint(folder, {"w": torch.ones(1000)}, {"step": 1})
    real_save = torch.save

    def half_then_hang(obj, handle):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        (folder / "READY").touch()
        time.sleep(600)  # the parent SIGKILLs us here, in the middle of the write

    torch.save = half_then_hang
    checkpoint.save_checkpoint(folder, {"w": torch.zeros(1_000_000)}, {"step": 2})
    """
)


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder)])
    try:
        deadline = time.time() + 120
        while not (folder / "READY").exists():
            assert child.poll() is None, "the writer exited before reaching the save"
            assert time.time() < deadline, "the writer never reached the second save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == ["." + f"tmp-step_000002-{child.pid}"]  # the half-written one
    assert latest_checkpoint(folder).name == "step_000001"
    state, meta = load_checkpoint(latest_checkpoint(folder))
    assert torch.equal(state["w"], torch.ones(1000)) and meta["step"] == 1
    # The next save sweeps the debris away.
    save_checkpoint(folder, {"w": torch.zeros(2)}, {"step": 3})
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_meta_is_plain_json(tmp_path):
    path = save_checkpoint(tmp_path, _state(4), {"step": 4, "model_config": {"a": 1}})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "minifusion-checkpoint-1" and meta["model_config"] == {"a": 1}


def test_a_missing_folder_is_reported_as_missing(tmp_path):
    save_checkpoint(tmp_path, _state(2), {"step": 2})
    with pytest.raises(CheckpointError, match=r"no checkpoint folder .*step_000001.*step_000002"):
        load_checkpoint(tmp_path / "step_000001")


def test_rng_state_has_a_fixed_size_and_keeps_cached_gaussians(tmp_path):
    sizes = set()
    for seed in range(20):  # a tuple of ints pickles to several sizes over these seeds
        random.seed(seed), np.random.seed(seed)
        random.gauss(0, 1), np.random.randn()  # leaves a cached Gaussian in both generators
        state = capture_rng_state()
        path = save_checkpoint(tmp_path / str(seed), {"rng": state}, {"step": 1})
        sizes.add((path / "state.pt").stat().st_size)
        expected = (random.gauss(0, 1), np.random.randn())
        restore_rng_state(load_checkpoint(path)[0]["rng"])
        assert (random.gauss(0, 1), np.random.randn()) == expected
    assert len(sizes) == 1
