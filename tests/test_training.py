"""The training loop: optimizer groups, schedule, accumulation, exact resume, guards, logs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minifusion import training
from minifusion.checkpoint import CheckpointMismatchError, latest_checkpoint, load_checkpoint
from minifusion.data import prepare_data, prepare_streaming_data
from minifusion.model import MiniFusionForCausalLM
from minifusion.tokenizer import load_tokenizer
from minifusion.train import apply_overrides, main
from minifusion.training import (
    BatchStream,
    StreamingBatches,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    ValidationSet,
    _token_weights,
    evaluate,
    parameter_groups,
    warmup_cosine,
)
from tests.test_model import small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared run folder on a small local corpus (tokenizer of 300, train/val token files)."""
    from tests.conftest import write_training_corpus

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_training_corpus(root / "corpus")
    data = prepare_data(
        root / "data", source=str(corpus / "*.txt"), vocab_size=300, val_fraction=0.2,
        progress=False,
    )  # fmt: skip
    return data, load_tokenizer(data.tokenizer_dir)


def _config(**overrides) -> TrainConfig:
    settings = dict(batch_size=4, block_size=16, max_steps=8, lr=3e-3, warmup_steps=2,
                    log_every=1, eval_every=4, eval_batches=2, save_every=4, sample_tokens=8,
                    tensorboard=False, device="cpu")  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def _trainer(prepared, out_dir, pattern="everything", seed=0, **overrides) -> Trainer:
    data, tokenizer = prepared
    torch.manual_seed(seed)
    model_overrides = {"moe_aux_loss_free_bias": True} if pattern == "everything" else {}
    model = MiniFusionForCausalLM(small_config(pattern, vocab_size=300, **model_overrides))
    return Trainer(model, tokenizer, data.train_file, data.val_file, _config(**overrides),
                   out_dir, progress=False, verbose=False)  # fmt: skip


# ----------------------------------------------------------------------------- optimizer ----
def test_parameter_groups_exclude_norms_biases_embeddings_and_ssm_constants():
    model = MiniFusionForCausalLM(small_config("everything", attention_bias=True))
    decay, no_decay = parameter_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = set(decay["param_names"]) | set(no_decay["param_names"])
    unique = {id(p) for p in model.parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(unique) == len(names)
    for name in no_decay["param_names"]:
        assert any(
            key in name
            for key in ("norm", "bias", "A_log", ".D", "embed_tokens", "gate_logit", "layernorm")
        ), name
    for required in ("A_log", "mamba.D", "dt_proj.bias", "embed_tokens.weight", "q_proj.bias"):
        assert any(required in n for n in no_decay["param_names"]), required
    for required in ("q_proj.weight", "dt_proj.weight", "down_proj.weight", "router.gate.weight"):
        assert any(required in n for n in decay["param_names"]), required
    decay_all, _ = parameter_groups(model, 0.1, decay_embeddings=True)
    assert any("embed_tokens" in n for n in decay_all["param_names"])


def test_warmup_cosine_shape_and_scheduler_agree():
    kw = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    assert warmup_cosine(109, **kw) == pytest.approx(0.1)
    after = [warmup_cosine(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(after, after[1:]))

    config = TrainConfig(lr=2e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    model = torch.nn.Linear(3, 3)
    optimizer = training.build_optimizer(model, config)
    scheduler = training.build_scheduler(optimizer, config)
    for step in range(110):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * warmup_cosine(step, **kw))
        optimizer.step()
        scheduler.step()


def test_train_config_from_dict_checks_names_and_values():
    config = TrainConfig.from_dict({"lr": "3e-4", "max_steps": "40", "tensorboard": "false"})
    assert (config.lr, config.max_steps, config.tensorboard) == (3e-4, 40, False)
    with pytest.raises(ValueError, match=r"Unknown train setting\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="train.max_steps='many' is not a valid int"):
        TrainConfig.from_dict({"max_steps": "many"})
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, max_steps\]; it is 10 "
                       r"with max_steps=5 \(.*--set train.warmup_steps=0\)"):  # fmt: skip
        TrainConfig.from_dict({"max_steps": 5, "warmup_steps": 10})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weight_decay": "nan"}, "weight_decay must be ≥ 0"),
        ({"beta1": 1.5}, r"beta1 and beta2 must be in \[0, 1\); they are 1.5 and 0.95"),
        ({"beta2": 1.0}, "beta1 and beta2 must be in"),
        ({"eps": -1}, "eps must be > 0"),
        ({"sample_temperature": 0}, "sample_temperature must be > 0 .*sample_tokens=0"),
    ],
)
def test_optimizer_and_sampling_settings_are_checked_before_any_step(settings, message):
    # torch would refuse these only when the optimizer is built (after the data is prepared),
    # and transformers a temperature of 0 only at the first evaluation.
    with pytest.raises(ValueError, match=f"Invalid training setting: {message}"):
        TrainConfig.from_dict(settings)


# ----------------------------------------------------------------------------- data ---------
def test_batch_stream_is_a_function_of_position_and_shards_ranks(prepared):
    data, _ = prepared
    stream = BatchStream(data.train_file, 16, 4, seed=3)
    batches = [stream.next_batch() for _ in range(stream.examples_per_epoch)]  # > one epoch
    resumed = BatchStream(data.train_file, 16, 4, seed=3, position=8)
    assert torch.equal(resumed.next_batch()[0], batches[2][0])
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    ranks = [BatchStream(data.train_file, 16, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    together = torch.cat([ranks[0].next_batch()[0], ranks[1].next_batch()[0]])
    assert torch.equal(together, batches[0][0])


def test_bits_per_character_counts_the_decoded_targets(prepared):
    data, tokenizer = prepared
    validation = ValidationSet(data.val_file, 16, tokenizer)
    span = validation.blocks.file.tokens[1 : len(validation) * 16 + 1].tolist()
    whole = len(tokenizer.decode(span, skip_special_tokens=True)) + span.count(0)
    # Block edges can split a multi-byte character (a few characters either way per edge).
    assert abs(int(validation.characters.sum()) - whole) <= 3 * len(validation)
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("llama", vocab_size=300))
    result = evaluate(model, validation, batch_size=4)
    assert result.tokens == 16 * len(validation)
    assert result.bpc == pytest.approx(
        result.loss * result.tokens / math.log(2) / result.characters
    )
    assert result.loss == pytest.approx(math.log(300), rel=0.05)  # untrained ≈ uniform


# ----------------------------------------------------------------------------- the loop -----
def test_gradient_accumulation_equals_one_large_batch(prepared, tmp_path):
    # The llama pattern: the gate regularisers, squares of batch means, are not additive.
    big = _trainer(prepared, tmp_path / "big", pattern="llama", batch_size=8)
    small = _trainer(prepared, tmp_path / "small", pattern="llama", batch_size=4,
                     grad_accum_steps=2)  # fmt: skip
    _assert_same_step(big, small)


def _assert_same_step(big: Trainer, small: Trainer) -> None:
    """One step of each: the same loss, gradient norm and gradients."""
    big_numbers, small_numbers = big.train_step(), small.train_step()
    assert small_numbers["loss"] == pytest.approx(big_numbers["loss"], rel=1e-5)
    assert small_numbers["grad_norm"] == pytest.approx(big_numbers["grad_norm"], rel=1e-5)
    # After one AdamW step the first moment is (1 − β₁)·gradient: compare the gradients.
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        grad_big = big.optimizer.state[a]["exp_avg"]
        grad_small = small.optimizer.state[b]["exp_avg"]
        torch.testing.assert_close(grad_small, grad_big, rtol=1e-4, atol=1e-8, msg=name)


def test_accumulated_micro_batches_are_weighted_by_their_scored_tokens(prepared, tmp_path):
    # Fine-tuning labels prompts -100, so micro-batches score different numbers of tokens; the
    # step must still equal one big batch (a plain average of the means would weigh the 3 scored
    # tokens of the first micro-batch as much as the 32 of the second).
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, 300, (4, 16), generator=generator)
    targets = torch.randint(1, 300, (4, 16), generator=generator)
    targets[:2] = -100
    targets[0, -3:] = torch.tensor([5, 6, 7])  # the first micro-batch scores 3 tokens
    big = _trainer(prepared, tmp_path / "big", pattern="llama", batch_size=4)
    small = _trainer(prepared, tmp_path / "small", pattern="llama", batch_size=2,
                     grad_accum_steps=2)  # fmt: skip
    big.batches.next_batch = lambda: (inputs, targets)
    halves = iter([(inputs[:2], targets[:2]), (inputs[2:], targets[2:])])
    small.batches.next_batch = lambda: next(halves)
    _assert_same_step(big, small)


def test_token_weights_are_exactly_one_for_full_blocks():
    full = [(None, torch.zeros(2, 8, dtype=torch.long))] * 3
    assert _token_weights(full) == [1.0, 1.0, 1.0]  # pretraining's average stays bit for bit
    ragged = [(None, torch.tensor([[1, -100, -100]])), (None, torch.tensor([[1, 2, 3]]))]
    assert _token_weights(ragged) == [0.5, 1.5]  # 1 and 3 of 4 scored tokens, times k = 2
    unscored = [(None, torch.full((1, 3), -100))] * 2
    assert _token_weights(unscored) == [1.0, 1.0]


@pytest.mark.parametrize("mode", [True, "branches"])
def test_gradient_checkpointing_gives_the_same_step(prepared, tmp_path, recwarn, mode):
    plain = _trainer(prepared, tmp_path / "plain", pattern="everything")
    recomputed = _trainer(prepared, tmp_path / "ckpt", pattern="everything",
                          gradient_checkpointing=mode)  # fmt: skip
    layers = recomputed.model.model.layers
    if mode is True:
        assert all(layer.gradient_checkpointing for layer in layers)
    else:  # only the branches inside each layer
        assert all(layer.checkpoint_branches and not layer.gradient_checkpointing
                   for layer in layers)  # fmt: skip
    a, b = plain.train_step(), recomputed.train_step()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert not [w for w in recwarn if "checkpoint" in str(w.message).lower()]


def test_gradient_checkpointing_settings_are_read_from_yaml_spellings():
    for value, mode in [(False, False), ("false", False), (True, "layers"), ("true", "layers"),
                        ("layers", "layers"), ("branches", "branches"), ("Branches", "branches")]:
        assert TrainConfig.from_dict({"gradient_checkpointing": value}).gradient_checkpointing == mode
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "layers"
    with pytest.raises(ValueError, match="'attention' is not false, true"):
        TrainConfig.from_dict({"gradient_checkpointing": "attention"})


def test_loss_falls(prepared, tmp_path):
    trainer = _trainer(prepared, tmp_path, pattern="hybrid-dense", max_steps=30, eval_every=30,
                       save_every=30, lr=1e-2)  # fmt: skip
    result = trainer.fit(export=False)
    losses = [r["loss"] for r in result.records if r["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_exact_resume_gives_bitwise_identical_losses_and_weights(prepared, tmp_path):
    straight = _trainer(prepared, tmp_path / "straight").fit(export=False)
    first_half = _trainer(prepared, tmp_path / "resumed").fit(stop_at=4, export=False)
    assert first_half.stopped_by == "stop_at" and first_half.step == 4
    # A new process would build a model with other random weights: the checkpoint must win.
    second = _trainer(prepared, tmp_path / "resumed", seed=123)
    assert second.resumed_from.name == "step_000004"
    resumed = second.fit(export=False)

    def losses(result):
        return [(r["step"], r["loss"]) for r in result.records if r["kind"] == "train"]

    assert losses(resumed) == losses(straight)  # exact float equality, every step
    last = [r for r in straight.records if r["kind"] == "train"][-1]
    assert 0.25 <= last["moe/layer1/max_load"] <= 1 and "gate/layer0/std" in last  # 4 experts
    assert [r["val_loss"] for r in resumed.records if r["kind"] == "eval"] == [
        r["val_loss"] for r in straight.records if r["kind"] == "eval"
    ]
    final_straight, _ = load_checkpoint(straight.checkpoint)
    final_resumed, meta = load_checkpoint(resumed.checkpoint)
    assert meta["data_position"] == final_straight["data_position"] == 8 * 4
    for key, value in final_straight["model"].items():
        assert torch.equal(value, final_resumed["model"][key]), key
    expert_bias = [k for k in final_straight["model"] if k.endswith("expert_bias")]
    assert expert_bias and any(final_straight["model"][k].abs().sum() > 0 for k in expert_bias)


def test_resume_takes_the_new_optimizer_settings(prepared, tmp_path):
    _trainer(prepared, tmp_path, lr=1e-2).fit(stop_at=4, export=False)
    new = dict(lr=1e-4, weight_decay=0.05, beta1=0.8, beta2=0.9, eps=1e-6, max_steps=10)
    resumed = _trainer(prepared, tmp_path, **new)
    assert resumed.resumed_from.name == "step_000004"
    assert resumed.changed_on_resume == {
        "lr": (1e-2, 1e-4), "max_steps": (8, 10), "weight_decay": (0.1, 0.05),
        "beta1": (0.9, 0.8), "beta2": (0.95, 0.9), "eps": (1e-8, 1e-6)}  # fmt: skip
    schedule = lambda step: training.warmup_cosine(step, warmup_steps=2, max_steps=10,
                                                   min_lr_ratio=0.1)  # fmt: skip
    for step in (4, 5, 6):  # the lr of step 4 (the first resumed one) and the next two
        for group in resumed.optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-4 * schedule(step), rel=1e-12)
            assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
            assert group["weight_decay"] == (0.05 if group["group_name"] == "decay" else 0.0)
        resumed.train_step()
    assert resumed.optimizer.state  # the moments came back from the checkpoint
    unchanged = _trainer(prepared, tmp_path / "unchanged", lr=1e-2)
    unchanged.fit(stop_at=2, export=False)
    assert _trainer(prepared, tmp_path / "unchanged", lr=1e-2).changed_on_resume == {}


def test_resume_refuses_another_model_config(prepared, tmp_path):
    _trainer(prepared, tmp_path, pattern="llama").fit(stop_at=4, export=False)
    data, tokenizer = prepared
    model = MiniFusionForCausalLM(small_config("llama", vocab_size=300, hidden_size=64))
    with pytest.raises(CheckpointMismatchError, match="hidden_size: checkpoint 32 vs run 64"):
        Trainer(model, tokenizer, data.train_file, data.val_file, _config(), tmp_path,
                progress=False)  # fmt: skip


@pytest.mark.slow
def test_nan_guard_skips_isolated_steps(prepared, tmp_path, monkeypatch):
    real = training.compute_loss
    calls = {"n": 0}

    def sometimes_nan(model, inputs, targets):
        calls["n"] += 1
        parts = real(model, inputs, targets)
        if calls["n"] == 3:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(training, "compute_loss", sometimes_nan)
    trainer = _trainer(prepared, tmp_path, pattern="hybrid-dense")
    before = {}

    def remember(t, numbers):
        if t.step == 2:
            before.update({k: v.clone() for k, v in t.model.state_dict().items()})
        if t.step == 3:
            assert numbers["skipped"]
            for key, value in t.model.state_dict().items():
                assert torch.equal(value, before[key]), key  # the optimizer did not step

    result = trainer.fit(export=False, on_step=remember)
    assert result.skipped_steps == 1 and result.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [r["skipped_steps"] for r in result.records if r["kind"] == "train"][-1] == 1


def test_nan_guard_stops_a_diverged_run(prepared, tmp_path):
    trainer = _trainer(prepared, tmp_path, pattern="hybrid-dense", max_bad_steps=3)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match="3 steps in a row.*lower train.lr") as error:
        trainer.fit(export=False)
    assert "no checkpoint was saved yet" in str(error.value)
    assert trainer.step == 3 and trainer.skipped_steps == 3


def test_metrics_jsonl_format(prepared, tmp_path):
    result = _trainer(prepared, tmp_path, pattern="hybrid-dense", log_every=2).fit(export=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["final"]
    for r in records:
        assert {"step", "loss", "lr", "tokens"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 16
    for r in evals:
        assert r["val_loss"] > 0 and 0 < r["val_bpc"] < r["val_loss"] * 3 / math.log(2)
    assert "gate/layer0/mean" in train[0] and "tokens_per_s" in train[0]
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "samples.txt").read_text().count("--- step") == 2
    assert result.records == records


def test_sample_tokens_zero_evaluates_without_sample_texts(prepared, tmp_path):
    trainer = _trainer(prepared, tmp_path, pattern="llama", max_steps=2, eval_every=2,
                       save_every=2, sample_tokens=0, tensorboard=True)  # fmt: skip
    result = trainer.fit(export=False)
    assert result.final_eval is not None and math.isfinite(result.final_eval.bpc)
    assert trainer.last_sample is None and not (tmp_path / "samples.txt").exists()
    with pytest.raises(ValueError, match="sample_tokens must be ≥ 0"):
        TrainConfig.from_dict({"sample_tokens": -1})


def test_tensorboard_events_are_written(prepared, tmp_path):
    _trainer(prepared, tmp_path, pattern="llama", tensorboard=True, max_steps=4).fit(export=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- the script ---
# ----------------------------------------------------------------------------- streaming ----
@pytest.fixture(scope="module")
def streamed(prepared, tmp_path_factory):
    """The same corpus, streamed: document 0 held out for validation, a tokenizer of 300."""
    corpus = Path(prepared[0].out_dir).parent / "corpus"
    stream = prepare_streaming_data(tmp_path_factory.mktemp("stream"), source=str(corpus / "*.txt"),
                                    vocab_size=300, val_documents=1, tokenizer_documents=10,
                                    progress=False)  # fmt: skip
    return stream, load_tokenizer(stream.tokenizer_dir)


def test_prepare_streaming_data_holds_out_the_first_documents(streamed, prepared):
    stream, tokenizer = streamed
    assert stream.val.num_documents == 1
    held_out = stream.val.num_characters
    corpus = Path(prepared[0].out_dir).parent / "corpus"
    assert held_out == len((corpus / "doc0.txt").read_text(encoding="utf-8"))  # the first file
    training = [doc["text"] for doc in stream.training_documents()]
    assert len(training) == 4 and training[0].startswith("A lantern")
    again = prepare_streaming_data(stream.out_dir, source=stream.source, vocab_size=300,
                                   val_documents=1, tokenizer_documents=10, progress=False)  # fmt: skip
    assert again.val.tokenizer_hash == stream.val.tokenizer_hash  # reused, not retrained
    with pytest.raises(ValueError, match="too few"):
        prepare_streaming_data(stream.out_dir / "x", source=stream.source, vocab_size=300,
                               val_documents=5, progress=False)  # fmt: skip


def test_streaming_batches_resume_by_position_and_split_ranks(streamed):
    stream, tokenizer = streamed
    documents = stream.training_documents()
    batches = StreamingBatches(documents, tokenizer, 16, 4)
    seen = [batches.next_batch() for _ in range(80)]
    assert batches.epoch >= 1  # the stream was read more than once
    x, y = seen[0]
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    resumed = StreamingBatches(documents, tokenizer, 16, 4, position=8)
    assert torch.equal(resumed.next_batch()[0], seen[2][0])
    resumed.position = 4 * 30  # moved from outside, as a checkpoint load does
    assert torch.equal(resumed.next_batch()[0], seen[30][0])

    def rows(rank: int) -> set[tuple[int, ...]]:
        share = StreamingBatches(documents, tokenizer, 16, 4, rank=rank, world_size=2)
        return {tuple(row.tolist()) for _ in range(3) for row in share.next_batch()[0]}

    assert rows(0).isdisjoint(rows(1))  # every rank reads its own documents
    too_many = StreamingBatches(documents, tokenizer, 16, 4, rank=0, world_size=5)
    with pytest.raises(ValueError, match="Rank 0 of 5 got no complete block"):
        too_many.next_batch()


def test_training_on_a_stream_resumes_exactly(streamed, tmp_path):
    stream, tokenizer = streamed

    def trainer(out_dir, seed=0):
        torch.manual_seed(seed)
        model = MiniFusionForCausalLM(small_config("everything", vocab_size=300))
        batches = StreamingBatches(stream.training_documents(), tokenizer, 16, 4)
        return Trainer(model, tokenizer, None, stream.val_file, _config(), out_dir,
                       progress=False, verbose=False, batches=batches)  # fmt: skip

    straight = trainer(tmp_path / "straight").fit(export=False)
    trainer(tmp_path / "resumed").fit(stop_at=4, export=False)
    resumed = trainer(tmp_path / "resumed", seed=7).fit(export=False)

    def losses(result):
        return [(r["step"], r["loss"]) for r in result.records if r["kind"] == "train"]

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 8


def _preset(tmp_path, prepared) -> Path:
    data, _ = prepared
    corpus = Path(data.out_dir).parent / "corpus"
    path = tmp_path / "preset.yaml"
    path.write_text(
        "model:\n  vocab_size: 300\n  hidden_size: 32\n  num_hidden_layers: 2\n"
        "  num_attention_heads: 4\n  num_key_value_heads: 2\n  mixer_types: [hybrid, hybrid]\n"
        "  ffn_types: [dense, dense]\n  mamba_d_state: 8\n  fusion_gate_rank: 8\n"
        f"data:\n  source: '{corpus}/*.txt'\n  val_fraction: 0.2\n  block_size: 16\n"
        "train:\n  batch_size: 4\n  max_steps: 6\n  warmup_steps: 2\n  eval_every: 3\n"
        "  save_every: 3\n  log_every: 1\n  eval_batches: 2\n  sample_tokens: 8\n"
        "  tensorboard: false\n  device: cpu\n",
        encoding="utf-8",
    )
    return path


def test_apply_overrides_converts_by_the_field_type_and_explains_mistakes():
    settings = apply_overrides(
        {"train": {"lr": 1.0}},
        ["train.lr=3e-4", "model.mixer_types=[hybrid, attention]", "train.sample_prompt=ROMEO:",
         "train.max_steps=1_000", "train.tensorboard=no", "data.source=*.txt",
         "data.encoding_errors=replace", "model.sliding_window=none", "model.mamba_dt_rank=auto",
         "model.pruned_fusion_layers=1,2", "train.sample_prompt=yes"],
    )  # fmt: skip
    assert settings["train"] == {"lr": 3e-4, "sample_prompt": "yes", "max_steps": 1000,
                                 "tensorboard": False}  # fmt: skip
    assert settings["data"] == {"source": "*.txt", "encoding_errors": "replace"}
    assert settings["model"] == {"mixer_types": ["hybrid", "attention"], "sliding_window": None,
                                 "mamba_dt_rank": "auto", "pruned_fusion_layers": [1, 2]}  # fmt: skip
    # text fields keep the text as typed: a prompt with a colon, spaces, a YAML-looking word
    for prompt in ("ROMEO:", " KING HENRY: ", "{a: b}", "true", "3"):
        assert (
            apply_overrides({}, [f"train.sample_prompt={prompt}"])["train"]["sample_prompt"]
            == prompt
        )
    assert apply_overrides({}, ["model.mamba_dt_rank=8"])["model"]["mamba_dt_rank"] == 8
    with pytest.raises(ValueError, match="train.max_steps takes a value of type int; '2.5'"):
        apply_overrides({}, ["train.max_steps=2.5"])
    with pytest.raises(ValueError, match="train.tensorboard takes a value of type bool"):
        apply_overrides({}, ["train.tensorboard=maybe"])
    with pytest.raises(ValueError, match="write section.name=value"):
        apply_overrides({}, ["lr=3"])
    with pytest.raises(ValueError, match="unknown section 'optim'"):
        apply_overrides({}, ["optim.lr=3"])


def test_data_encoding_errors_is_a_setting_of_both_commands(tmp_path, capsys):
    from minifusion.data import main as data_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    (corpus / "a.txt").write_bytes(text.encode() + b"caf\xe9\n")  # Latin-1, not UTF-8
    (corpus / "b.txt").write_text(text * 2, encoding="utf-8")
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"model:\n  vocab_size: 300\ndata:\n  source: '{corpus}/*.txt'\n"
                      "  val_fraction: 0.5\n", encoding="utf-8")  # fmt: skip
    assert data_main(["--config", str(preset), "--out", str(tmp_path / "strict")]) == 1
    error = capsys.readouterr().err
    assert "not valid UTF-8" in error and "--set data.encoding_errors=replace" in error
    assert data_main(["--config", str(preset), "--out", str(tmp_path / "replaced"),
                      "--set", "data.encoding_errors=replace"]) == 0  # fmt: skip
    assert "train" in capsys.readouterr().out
    assert (tmp_path / "replaced" / "train.bin").is_file()
    # several settings after one --set, and --set repeated: both are taken
    assert main(["--config", str(preset), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "data.encoding_errors=replace", "train.max_steps=1",
                 "train.warmup_steps=0", "train.eval_batches=1",
                 "--set", "train.batch_size=2", "--set", "data.block_size=16",
                 "--set", "train.sample_tokens=2", "--set", "train.tensorboard=false",
                 "--set", "train.sample_prompt=ROMEO:"]) == 0  # fmt: skip
    assert "bits/character" in capsys.readouterr().out
    resolved = (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")
    assert "max_steps: 1" in resolved and "eval_batches: 1" in resolved


def test_script_trains_resumes_and_exports(prepared, tmp_path, capsys):
    preset, out = _preset(tmp_path, prepared), tmp_path / "run"
    assert main(["--config", str(preset), "--out", str(out), "--no-progress",
                 "--set", "train.max_steps=3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "bits/character" in printed
        and "model (HF)" in printed
        and "starting from scratch" in printed
    )
    assert main(["--config", str(preset), "--out", str(out), "--no-progress",
                 "--set", "train.lr=1e-3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "step_000003" in printed
    assert "train.lr: 0.003 in the checkpoint → 0.001 from now on" in printed
    assert latest_checkpoint(out / "checkpoints").name == "step_000006"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s)  # no repeated steps
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.hidden_size == 32
    assert main(["--config", str(preset), "--out", str(out), "--no-progress", "--fresh",
                 "--set", "train.max_steps=2"]) == 0  # fmt: skip
    assert latest_checkpoint(out / "checkpoints").name == "step_000002"
    assert main(["--config", str(preset), "--out", str(out), "--set", "train.typo=1"]) == 1
    assert "Unknown train setting(s) ['typo']" in capsys.readouterr().err


def test_script_names_a_bad_preset_out_folder_or_device(prepared, tmp_path, capsys):
    preset = _preset(tmp_path, prepared)
    (tmp_path / "a_file").write_text("not a run")
    with pytest.raises(SystemExit):
        main(["--config", str(preset), "--out", str(tmp_path / "a_file")])
    assert "--out" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "not a run"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  hidden_size: [32\n", encoding="utf-8")
    assert main(["--config", str(broken), "--out", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert f"error: {broken} is not valid YAML" in error and "line 2" in error
    for device, message in (("bogus", "'bogus' is not a device: use auto, cpu, cuda"),
                            ("cuda:x", "'cuda:x' is not a device")):  # fmt: skip
        assert main(["--config", str(preset), "--out", str(tmp_path / "run"), "--no-progress",
                     "--set", f"train.device={device}"]) == 1  # fmt: skip
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # named before the run folder and its data
    assert main(["--config", str(preset), "--out", str(tmp_path / "long"), "--no-progress",
                 "--set", "data.block_size=4096"]) == 1  # fmt: skip
    error = capsys.readouterr().err
    assert "(4,096 tokens: data.block_size, or train.block_size) are longer than" in error
    assert not (tmp_path / "long" / "train.bin").exists()  # refused before the data is prepared


def test_script_trains_on_a_streamed_corpus(prepared, tmp_path, capsys):
    preset, out = _preset(tmp_path, prepared), tmp_path / "run"
    assert main(["--config", str(preset), "--out", str(out), "--no-progress",
                 "--set", "data.streaming=true", "--set", "data.val_documents=1",
                 "--set", "train.max_steps=3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Prepared a streamed corpus" in printed and "tokenised on the fly" in printed
    assert "bits/character" in printed and not (out / "train.bin").exists()


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(prepared, tmp_path):
    preset, out = _preset(tmp_path, prepared), tmp_path / "run"
    command = [sys.executable, "-m", "minifusion.train", "--config", str(preset), "--out",
               str(out), "--no-progress", "--set", "train.max_steps=100000",
               "--set", "train.save_every=100000", "--set", "train.eval_every=100000"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert child.poll() is None, child.stdout.read()
            assert time.time() < deadline, "training never started"
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output
    assert "stopped by SIGTERM" in output and "run the same command again" in output
    checkpoint = latest_checkpoint(out / "checkpoints")
    state, meta = load_checkpoint(checkpoint)
    assert meta["step"] >= 1 and state["step"] == meta["step"]
    assert not (out / "model").exists()  # no export for an unfinished run


# ------------------------------------------------------------------------ fp16 and TF32 ----
def test_auto_precision_picks_fp16_with_a_scaler_on_gpus_without_bf16(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert training.autocast_dtype("auto", cuda) == torch.float16  # T4, V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert training.autocast_dtype("auto", cuda) == torch.bfloat16  # A100, H100
    assert training.autocast_dtype("auto", cpu) is None
    assert training.autocast_dtype("fp16", cpu) == torch.float16
    assert training.grad_scaler(torch.float16, cpu) is not None
    assert training.grad_scaler(torch.bfloat16, cpu) is None and training.grad_scaler(None, cpu) is None
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        TrainConfig(precision="fp8").validate()


def test_fp16_loss_scaling_skips_overflowing_steps_and_recovers(prepared, tmp_path):
    trainer = _trainer(prepared, tmp_path, pattern="hybrid-dense", precision="fp16",
                       max_steps=40, eval_every=40, save_every=40, lr=1e-2)  # fmt: skip
    # A scale far too large: the fp16 backward overflows to inf until it has been halved enough.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**32, growth_interval=5)
    result = trainer.fit(export=False)
    train = [r for r in result.records if r["kind"] == "train"]
    skipped = [r["step"] for r, before in zip(train, [{"skipped_steps": 0}, *train])
               if r["skipped_steps"] > before["skipped_steps"]]  # fmt: skip
    first = next(k for k in range(len(skipped) + 1) if k == len(skipped) or skipped[k] != k + 1)
    assert first >= 3  # the opening steps overflow, one after another ...
    scales = [r["loss_scale"] for r in train]
    assert scales[:first] == [2.0 ** (32 - k) for k in range(1, first + 1)]  # ... halving each time
    assert len(skipped) - first <= 8  # then the scale fits and most steps apply
    assert max(scales[first:]) > min(scales)  # and it grows again after 5 good steps in a row
    assert result.skipped_steps == len(skipped) and result.step == 40  # no divergence error
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    untrained = sum(r["loss"] for r in train[:first]) / first  # skipped steps leave the weights
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.9 * untrained  # it learns once steps apply


def test_fp16_resume_restores_the_loss_scale_exactly(prepared, tmp_path):
    settings = dict(pattern="hybrid-dense", precision="fp16")
    straight = _trainer(prepared, tmp_path / "straight", **settings).fit(export=False)
    _trainer(prepared, tmp_path / "resumed", **settings).fit(stop_at=4, export=False)
    resumed = _trainer(prepared, tmp_path / "resumed", seed=7, **settings)
    assert resumed.resumed_from.name == "step_000004"
    result = resumed.fit(export=False)

    def trace(run):
        return [(r["step"], r["loss"], r["loss_scale"]) for r in run.records if r["kind"] == "train"]

    assert trace(result) == trace(straight)
    state, _ = load_checkpoint(straight.checkpoint)
    assert state["grad_scaler"]["scale"] == trace(straight)[-1][2]


def test_tf32_switches_cuda_matmuls_to_tensor_cores(prepared, tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        _trainer(prepared, tmp_path, pattern="llama", tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_dry_run_plans_the_reference_run_without_building_it(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run built a model")

    monkeypatch.setattr(MiniFusionForCausalLM, "__init__", refuse)
    out = tmp_path / "run"
    code = main(["--config", str(REPO / "configs/fusiontree-1.5b.yaml"), "--out", str(out),
                 "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"), "--gpus", "8",
                 "--dry-run"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()  # nothing written
    import yaml

    resolved = yaml.safe_load(printed)  # the settings print as YAML, the rest as comments
    assert resolved["train"] == {**resolved["train"], "batch_size": 4, "grad_accum_steps": 2,
                                 "gradient_checkpointing": True, "block_size": 1024}  # fmt: skip
    assert "4 sequences × 1,024 tokens × 2 accumulation × 8 GPU(s) = 65,536 tokens" in printed
    assert "ZeRO-2 on 8 GPU(s), activation checkpointing on" in printed
    # model states: 16 bytes per parameter of ZeRO-2's table, ZeRO-2's shards of 8
    from minifusion.config import MiniFusionConfig
    from minifusion.zero import bytes_per_parameter

    n = MiniFusionConfig.from_preset("fusiontree-1.5b").estimate_parameters()
    expected = {k: n * v / 2**30 for k, v in bytes_per_parameter(2, 8).items()}
    for name, gib in expected.items():
        assert f"#   {name:<12} {gib:8.2f} GiB" in printed
    # a plan for no GPU, or an estimate from nan TFLOPS, is refused (not planned for 1, not nan)
    preset = ["--config", str(REPO / "configs/tiny.yaml"), "--out", str(out), "--dry-run"]
    for flags, message in ((["--gpus", "0"], "--gpus must be ≥ 1 (got 0)"),
                           (["--peak-tflops", "nan"], "--peak-tflops must be > 0")):  # fmt: skip
        assert main([*preset, *flags]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*preset, "--stop-at", "-3"])
    assert "--stop-at must be a step ≥ 1, not -3" in capsys.readouterr().err



@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one(prepared, tmp_path):
    runs = {}
    for compiled in (False, True):
        trainer = _trainer(prepared, tmp_path / str(compiled), pattern="llama", compile=compiled,
                           max_steps=3, eval_every=3, save_every=3)  # fmt: skip
        result = trainer.fit(export=False)
        runs[compiled] = [r["loss"] for r in result.records if r["kind"] == "train"]
    assert runs[True] == pytest.approx(runs[False], abs=1e-4)


def test_training_with_the_chunked_loss_follows_the_full_logits(prepared, tmp_path, monkeypatch):
    from minifusion import evaluation

    calls = []
    chunked = evaluation.chunked_cross_entropy
    monkeypatch.setattr(evaluation, "chunked_cross_entropy",
                        lambda *args: calls.append(args[-1]) or chunked(*args))  # fmt: skip
    runs = {}
    for chunk_rows in (0, 16):
        trainer = _trainer(prepared, tmp_path / str(chunk_rows), loss_chunk_rows=chunk_rows,
                           max_steps=3, eval_every=3, save_every=3)  # fmt: skip
        result = trainer.fit(export=False)
        runs[chunk_rows] = [r["loss"] for r in result.records if r["kind"] == "train"]
    assert len(runs[16]) == 3 and runs[16] == pytest.approx(runs[0], abs=1e-5)
    assert calls == [16] * 3  # one chunked loss per training step, none in the full run
