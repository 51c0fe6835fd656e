"""Pruning: plans from gate statistics, measured decisions, pruned models and their export."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from minifusion.cache import HybridCache
from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM
from minifusion.monitor import GateSnapshot, collect_gate_statistics
from minifusion.prune import (
    check_plan,
    export_pruned,
    forced_gates,
    propose_plan,
    prune_model,
    pruned_config,
)
from minifusion.training import Trainer, evaluate
from tests.conftest import library_progress_bar_on
from tests.test_model import small_config
from tests.test_training import _config, prepared  # noqa: F401  (fixture)


def _hybrid_model(seed: int = 0, **overrides) -> MiniFusionForCausalLM:
    """Three hybrid layers (dense FFNs, MoE in the middle) with weights large enough to matter."""
    torch.manual_seed(seed)
    config = small_config("hybrid-dense", num_hidden_layers=3, mixer_types=["hybrid"] * 3,
                          ffn_types=["dense", "moe", "dense"], **overrides)  # fmt: skip
    model = MiniFusionForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):  # noqa: F811
    """Three hybrid layers trained for 40 steps, so that both branches carry something."""
    data, tokenizer = prepared
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(
        small_config(
            "hybrid-dense",
            vocab_size=300,
            num_hidden_layers=3,
            mixer_types=["hybrid"] * 3,
            ffn_types=["dense"] * 3,
        )
    )
    settings = _config(max_steps=40, eval_every=40, save_every=40)
    trainer = Trainer(
        model,
        tokenizer,
        data.train_file,
        data.val_file,
        settings,
        tmp_path_factory.mktemp("trained"),
        progress=False,
        verbose=False,
    )
    trainer.fit(export=False)
    return trainer.model.eval(), trainer.validation


def _snapshot(means: list[float]) -> GateSnapshot:
    n = len(means)
    return GateSnapshot(0, "val", list(range(n)), torch.tensor(means), torch.zeros(n),
                        torch.tensor(means)[:, None].repeat(1, 4), 100)  # fmt: skip


def test_propose_plan_follows_the_thresholds():
    plan = propose_plan(_snapshot([0.95, 0.5, 0.05, 0.92]), mamba_above=0.9, attention_below=0.1)
    assert plan == {0: "mamba", 1: "both", 2: "attention", 3: "mamba"}
    with pytest.raises(ValueError, match="attention_below < mamba_above"):
        propose_plan(_snapshot([0.5]), mamba_above=0.2, attention_below=0.4)


@pytest.mark.parametrize("keep", [{0: "attention", 2: "mamba"}, {1: "mamba"}, {1: "attention"}])
def test_pruned_model_computes_the_gate_fixed_model_and_decodes_with_a_smaller_cache(keep):
    model = _hybrid_model()
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad(), forced_gates(model, keep):
        expected = model(ids).logits
    pruned = prune_model(model, keep)
    config = pruned.config
    assert config.pruned_fusion_layers == sorted(keep)
    assert [config.mixer_types[i] for i in sorted(keep)] == [keep[i] for i in sorted(keep)]
    assert sum(p.numel() for p in pruned.parameters()) == config.estimate_parameters()
    assert config.estimate_parameters() < model.config.estimate_parameters()
    for layer, branch in keep.items():
        removed = "mamba" if branch == "attention" else "attn"
        assert getattr(pruned.model.layers[layer], removed) is None
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, atol=1e-5, rtol=1e-5)
        # cached decoding of the pruned model equals its full forward pass
        cache = HybridCache(pruned.model, batch_size=2)
        steps = [pruned(ids[:, :12], past_key_values=cache).logits]
        for t in range(12, 20):
            step = pruned(ids[:, t : t + 1], past_key_values=cache)
            steps.append(step.logits)
        # step-by-step sums run in another order than the full pass: the cache tests' tolerance
        torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=1e-4)
    if "mamba" in keep.values():  # a layer that keeps Mamba holds no keys and values
        layer = next(i for i, b in keep.items() if b == "mamba")
        assert cache.layers[layer].kv is None and cache.layers[layer].mamba is not None


def test_pruned_export_loads_with_from_pretrained_and_generates(tmp_path, small_tokenizer):
    model = _hybrid_model(vocab_size=len(small_tokenizer))
    path = export_pruned(model, {1: "mamba"}, small_tokenizer, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert loaded.config.mixer_types == ["hybrid", "mamba", "hybrid"]
    assert loaded.config.pruned_fusion_layers == [1]
    ids = torch.randint(0, len(small_tokenizer), (1, 10))
    with torch.no_grad(), forced_gates(model, {1: "mamba"}):
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                          do_sample=False, pad_token_id=0)  # fmt: skip
    assert out.shape == (1, 15)


def test_check_plan_measures_each_removal_and_refuses_costly_ones(trained):
    model, validation = copy.deepcopy(trained[0]), trained[1]
    with torch.no_grad():  # layer 0 now listens only to Mamba: removing attention costs ~nothing
        model.model.layers[0].fusion.gate_down.weight.zero_()
        model.model.layers[0].fusion.gate_down.bias.fill_(30.0)
    snapshot = collect_gate_statistics(model, validation, batch_size=4, max_blocks=8)
    assert snapshot.mean[0] > 0.999
    proposal = propose_plan(snapshot, mamba_above=0.99, attention_below=0.01)
    assert proposal == {0: "mamba", 1: "both", 2: "both"}
    proposal[2] = "attention"  # a removal the statistics do not support: it must be refused
    plan = check_plan(model, proposal, validation, snapshot, max_loss_increase=1e-3,
                      batch_size=4, max_blocks=8)  # fmt: skip
    by_layer = {d.layer: d for d in plan.decisions}
    assert abs(by_layer[0].loss_increase) < 1e-4 and by_layer[0].decision == "mamba"
    assert by_layer[2].loss_increase > 1e-3 and by_layer[2].decision == "both"
    assert by_layer[1].loss_increase is None and plan.keep == {0: "mamba"}
    measured = evaluate(prune_model(model, plan), validation, batch_size=4, max_blocks=8).loss
    assert measured == pytest.approx(plan.pruned_loss, abs=1e-5)
    assert "within budget" in plan.table() and "costs more than the budget" in plan.table()


def test_joint_check_puts_back_the_costliest_removal(monkeypatch):
    """The decision logic, on a validation loss we define: each removal alone costs 0.01 or
    0.015, together they cost 0.05 — over a budget of 0.02 that each fits alone."""
    from minifusion import training

    model = _hybrid_model()
    cost = {0: 0.010, 2: 0.015}

    def fake_evaluate(model, validation, **kwargs):
        forced = [i for i, layer in enumerate(model.model.layers)
                  if layer.fusion is not None and layer.fusion.forced_gate is not None]  # fmt: skip
        loss = 2.0 + (0.05 if len(forced) == 2 else sum(cost[i] for i in forced))
        return training.EvalResult(loss=loss, bpc=0.0, tokens=1, characters=1)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    plan = check_plan(model, {0: "mamba", 1: "both", 2: "attention"}, None,
                      _snapshot([0.95, 0.5, 0.05]), max_loss_increase=0.02)  # fmt: skip
    by_layer = {d.layer: d for d in plan.decisions}
    assert by_layer[0].loss_increase == pytest.approx(0.010)
    assert by_layer[2].loss_increase == pytest.approx(0.015)
    assert plan.keep == {0: "mamba"}  # layer 2, the costlier, was put back
    assert "put back" in by_layer[2].reason and by_layer[2].decision == "both"
    assert plan.pruned_loss == pytest.approx(2.010)


def test_clear_errors_for_impossible_pruning():
    model = _hybrid_model()
    with pytest.raises(ValueError, match="not hybrid layers"):
        with forced_gates(model, {5: "mamba"}):
            pass
    llama_like = small_config("everything")
    with pytest.raises(ValueError, match="only hybrid layers can be pruned"):
        pruned_config(llama_like, {1: "mamba"})
    with pytest.raises(ValueError, match="Unknown choice"):
        pruned_config(model.config, {0: "neither"})
    with pytest.raises(ValueError, match="must be 'attention' or 'mamba'"):
        MiniFusionConfig(num_hidden_layers=2, mixer_types=["hybrid", "mamba"],
                         pruned_fusion_layers=[0])  # fmt: skip
    with pytest.raises(ValueError, match="list only existing layers"):
        MiniFusionConfig(num_hidden_layers=2, pruned_fusion_layers=[3])


def test_command_line_prunes_a_finished_run(prepared, tmp_path, capsys):  # noqa: F811
    from minifusion.prune import main as prune_main
    from minifusion.train import main as train_main
    from tests.test_training import _preset

    preset, run = _preset(tmp_path, prepared), tmp_path / "run"
    assert train_main(["--config", str(preset), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prune_main(["--run", str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err
    # thresholds that propose keeping Mamba in every layer, a budget that accepts it
    with library_progress_bar_on():
        assert prune_main(["--run", str(run), "--mamba-above", "0.01", "--attention-below", "0",
                           "--max-loss-increase", "100", "--blocks", "4", "--context", "20",
                           "--no-progress"]) == 0  # fmt: skip
    printed, err = capsys.readouterr()
    assert "Loading weights" not in err  # transformers' own bar obeys --no-progress
    assert (
        "within budget" in printed and "unpruned" in printed and "pruned model written" in printed
    )
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    assert pruned.config.mixer_types == ["mamba", "mamba"]
    assert pruned.config.pruned_fusion_layers == [0, 1]
    assert "nothing was pruned" not in printed
    # thresholds no gate can cross: the copy is the run's model, and the output says so
    assert prune_main(["--run", str(run), "--mamba-above", "1", "--attention-below", "0",
                       "--blocks", "4", "--context", "20", "--out", str(tmp_path / "same")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "nothing was pruned: every hybrid layer keeps both branches" in printed


def test_command_line_explains_a_model_without_hybrid_layers(tmp_path, capsys):
    from minifusion.prune import main as prune_main

    run = tmp_path / "run"
    base = small_config("everything")
    config = base.replaced(mixer_types=["attention", "mamba"] * (base.num_hidden_layers // 2))
    MiniFusionForCausalLM(config).save_pretrained(run / "model")
    (run / "val.bin").write_bytes(b"")  # never read: the model is refused first
    (run / "config.yaml").write_text("data: {block_size: 16}\n")
    with pytest.raises(SystemExit):
        prune_main(["--run", str(run)])
    error = capsys.readouterr().err
    assert "no parallel hybrid layer" in error and "tiny-parallel.yaml" in error


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--blocks", "0"], "--blocks must be ≥ 1, not 0"),
        (["--context", "0"], "--context must be ≥ 1, not 0"),
        (["--mamba-above", "0.05"], "must satisfy 0 ≤ attention-below < mamba-above ≤ 1"),
        (["--max-loss-increase", "nan"], "--max-loss-increase must be ≥ 0"),
        (["--out", "{notes}"], "not a model export (it has no config.json)"),
    ],
)
def test_command_line_refuses_bad_arguments_before_loading_anything(
    tmp_path, capsys, monkeypatch, flags, message
):
    from minifusion import prune

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    monkeypatch.setattr(prune, "export_pruned", lambda *a: pytest.fail("exported"))
    with pytest.raises(SystemExit):  # the run folder does not exist: checked after the flags
        prune.main(["--run", str(tmp_path / "no-run"), *(f.format(notes=notes) for f in flags)])
    assert message in capsys.readouterr().err
    assert (notes / "mine.txt").read_text() == "keep me"


def test_check_plan_names_non_hybrid_layers_and_pruning_keeps_dtypes():
    model = MiniFusionForCausalLM(small_config("everything"))
    with pytest.raises(ValueError, match=r"layers \[1\], which are not hybrid layers"):
        check_plan(model, {1: "mamba"}, None, _snapshot([0.5, 0.5, 0.5, 0.5]))
    bf16 = model.to(torch.bfloat16)  # Mamba's A_log, D and dt_proj stay fp32 (design.md)
    pruned = prune_model(bf16, {0: "attention", 3: "mamba"})
    source = dict(bf16.named_parameters())
    for name, parameter in pruned.named_parameters():
        assert parameter.dtype == source[name].dtype, name
    assert pruned.model.layers[3].mamba.in_proj.weight.dtype == torch.bfloat16
    assert pruned.model.layers[3].mamba.A_log.dtype == torch.float32
    assert pruned.lm_head.weight is pruned.get_input_embeddings().weight  # still tied
