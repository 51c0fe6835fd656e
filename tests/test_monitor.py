"""Gate monitoring: pooled statistics, per-step history, checkpoints, heatmaps."""

from __future__ import annotations

import pytest
import torch

from minifusion.checkpoint import load_checkpoint
from minifusion.model import MiniFusionForCausalLM
from minifusion.monitor import (
    GateMonitor,
    collect_gate_statistics,
    plot_gate_heatmaps,
    plot_layer_channel,
    plot_layer_step,
)
from minifusion.training import ValidationSet
from tests.test_model import small_config
from tests.test_training import _trainer, prepared  # noqa: F401  (fixture)


def _model(seed: int = 0, **overrides) -> MiniFusionForCausalLM:
    torch.manual_seed(seed)
    model = MiniFusionForCausalLM(small_config("everything", **overrides))
    with torch.no_grad():  # spread the gates so that their statistics are not all ½
        for layer in model.model.layers:
            if layer.fusion is not None and layer.fusion.keep is None:
                layer.fusion.gate_down.weight.normal_(0, 2.0)
                layer.fusion.gate_down.bias.normal_(0, 1.0)
    return model


def _gates_of(model, run) -> dict[int, list[torch.Tensor]]:
    """The gate tensors every forward pass inside ``run()`` computed, per hybrid layer."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in model.model.layers:
        if layer.fusion is not None and layer.fusion.keep is None:

            def keep(module, inputs, output, i=layer.layer_idx):
                seen.setdefault(i, []).append(module.last_gate.detach().reshape(-1, 32))

            handles.append(layer.fusion.register_forward_hook(keep))
    run()
    for handle in handles:
        handle.remove()
    return seen


def test_pooled_statistics_equal_those_over_every_token():
    model = _model()
    monitor = GateMonitor(model)
    assert monitor.layers == [0, 3]  # the hybrid layers of the "everything" pattern
    batches = [torch.randint(0, 61, shape) for shape in ((2, 9), (1, 17), (3, 4))]

    def evaluate():
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch)

    with monitor.evaluating(step=7):
        gates = _gates_of(model, evaluate)
    snapshot = monitor.evaluations[-1]
    assert snapshot.step == 7 and snapshot.split == "val" and snapshot.tokens == 18 + 17 + 12
    for row, layer in enumerate(monitor.layers):
        every = torch.cat(gates[layer]).double()  # (tokens, H)
        assert float(every.std()) > 0.05  # the statistics below are not trivially ½ and 0
        torch.testing.assert_close(snapshot.mean[row].double(), every.mean(), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            snapshot.std[row].double(), every.std(correction=0), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            snapshot.channel_mean[row].double(), every.mean(0), atol=1e-6, rtol=0
        )


def test_a_step_row_covers_every_micro_batch_and_only_training_passes():
    model = _model().train()
    monitor = GateMonitor(model)
    micro = [torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (1, 5))]

    def step():
        for batch in micro:
            model(batch, labels=batch).loss.backward()

    gates = _gates_of(model, step)
    model.eval()
    with torch.no_grad():
        model(micro[0])  # an eval-mode pass outside `evaluating` (a sample): not counted
    model.train()
    fusions = [model.model.layers[i].fusion for i in monitor.layers]
    with torch.no_grad():
        for fusion in fusions:
            fusion.forced_gate = 1.0
        model(micro[0])  # a pass with fixed gates (pruning measurement): not counted
        for fusion in fusions:
            fusion.forced_gate = None
    monitor.end_step(1)
    monitor.end_step(2)  # no training pass since step 1: no row
    assert monitor.steps == [1]
    for row, layer in enumerate(monitor.layers):
        every = torch.cat(gates[layer]).double()
        assert monitor.step_mean[0][row] == pytest.approx(float(every.mean()), abs=1e-6)
        assert monitor.step_std[0][row] == pytest.approx(float(every.std(correction=0)), abs=1e-5)
    with monitor.evaluating(step=2):
        pass
    window = monitor.train_windows[-1]
    assert window.split == "train" and window.tokens == 16 + 5
    assert monitor.step_matrix().shape == (2, 1)


def test_state_dict_round_trip_and_a_clear_error_for_another_layout():
    model = _model().train()
    monitor = GateMonitor(model)
    for step in (1, 2, 3):
        batch = torch.randint(0, 61, (2, 6))
        model(batch)
        monitor.end_step(step)
        if step == 2:
            with monitor.evaluating(step):
                model.eval()
                model(batch)
                model.train()
    model(torch.randint(0, 61, (2, 6)))  # pending training sums, not yet in a snapshot
    copy = GateMonitor(_model(seed=1))
    copy.load_state_dict(monitor.state_dict())
    assert copy.steps == monitor.steps and copy.step_mean == monitor.step_mean
    assert torch.equal(copy.evaluations[0].channel_mean, monitor.evaluations[0].channel_mean)
    with monitor.evaluating(4), copy.evaluating(4):
        pass
    assert copy.train_windows[-1].tokens == monitor.train_windows[-1].tokens == 2 * 6 * 2
    assert torch.equal(copy.train_windows[-1].mean, monitor.train_windows[-1].mean)

    other = GateMonitor(MiniFusionForCausalLM(small_config("hybrid-dense")))
    with pytest.raises(ValueError, match="another model layout"):
        other.load_state_dict(monitor.state_dict())
    assert len(GateMonitor(MiniFusionForCausalLM(small_config("llama")))) == 0


@pytest.mark.slow
def test_trainer_records_gates_saves_them_and_resumes_them_exactly(prepared, tmp_path):  # noqa: F811
    straight = _trainer(prepared, tmp_path / "straight").fit(export=False)
    _trainer(prepared, tmp_path / "resumed").fit(stop_at=4, export=False)
    resumed = _trainer(prepared, tmp_path / "resumed", seed=5).fit(export=False)
    state, _ = load_checkpoint(straight.checkpoint)
    history = state["gate_monitor"]
    assert history["steps"] == list(range(1, 9)) and history["layers"] == [0, 3]
    assert [s["step"] for s in history["evaluations"]] == [4, 8]
    resumed_history = load_checkpoint(resumed.checkpoint)[0]["gate_monitor"]
    assert resumed_history["step_mean"] == history["step_mean"]
    for a, b in zip(resumed_history["evaluations"], history["evaluations"]):
        assert torch.equal(a["channel_mean"], b["channel_mean"])
    train = [r for r in straight.records if r["kind"] == "train"]
    evals = [r for r in straight.records if r["kind"] == "eval"]
    assert train[-1]["gate/layer3/mean"] == history["step_mean"][-1][1]
    assert evals[-1]["val_gate/layer0/mean"] == pytest.approx(
        float(history["evaluations"][-1]["mean"][0])
    )
    assert (tmp_path / "straight" / "gate_heatmaps.png").stat().st_size > 0


def test_collect_gate_statistics_and_heatmaps(prepared):  # noqa: F811
    data, tokenizer = prepared
    model = _model(vocab_size=300)
    validation = ValidationSet(data.val_file, 16, tokenizer)
    snapshot = collect_gate_statistics(model, validation, batch_size=2, max_blocks=4)
    assert snapshot.tokens == 4 * 16 and snapshot.channel_mean.shape == (2, 32)
    rows = snapshot.summary()
    assert [r["layer"] for r in rows] == [0, 3]
    assert all(r["channel_min"] <= r["mean"] <= r["channel_max"] for r in rows)
    ax = plot_layer_channel(snapshot)
    assert ax.images[0].get_array().shape == (2, 32)
    monitor = GateMonitor(model)
    for step in (1, 2, 3):
        model.train()(torch.randint(0, 300, (1, 5)))
        monitor.end_step(step)
    assert plot_layer_step(monitor).images[0].get_array().shape == (2, 3)
    assert plot_gate_heatmaps(monitor) is not None
    with pytest.raises(ValueError, match="no hybrid layer"):
        collect_gate_statistics(
            MiniFusionForCausalLM(small_config("llama", vocab_size=300)), validation
        )


def test_padding_passes_of_a_distributed_evaluation_are_not_counted(prepared):  # noqa: F811
    from minifusion.training import validation_sums

    data, tokenizer = prepared
    model = _model(vocab_size=300)
    validation = ValidationSet(data.val_file, 16, tokenizer)
    monitor = GateMonitor(model)
    with monitor.evaluating(0):  # two blocks scored, then two padding passes for the collectives
        _, tokens, _ = validation_sums(model, validation, [0, 2], batch_size=2, forward_passes=3)
    assert tokens == 2 * 16 and monitor.evaluations[-1].tokens == tokens
