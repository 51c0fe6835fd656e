"""The chunked cross-entropy equals PyTorch's cross-entropy of the full logits, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minifusion.chunked_loss import chunked_cross_entropy
from minifusion.evaluation import compute_loss
from minifusion.model import MiniFusionForCausalLM
from minifusion.train_config import TrainConfig
from tests.test_model import small_config


def _problem(rows=37, hidden=8, vocab=11, dtype=torch.float64, ignored=(3, 9)):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, dtype=dtype, generator=generator).requires_grad_()
    w = torch.randn(vocab, hidden, dtype=dtype, generator=generator).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=generator)
    t[list(ignored)] = -100
    return h, w, t


@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 38, 1000])
def test_loss_and_gradients_equal_the_full_logits(chunk_rows):
    h, w, t = _problem()
    reference = F.cross_entropy(h @ w.t(), t)  # ignores the -100 rows, mean over the rest
    want = torch.autograd.grad(reference, (h, w))
    loss = chunked_cross_entropy(h, w, t, chunk_rows)
    got = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-14)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-14)
    assert got[0][[3, 9]].abs().max() == 0  # an ignored row gets no gradient


def test_gradcheck_and_an_incoming_gradient_scales_both_gradients():
    h, w, t = _problem(rows=9, hidden=3, vocab=5, ignored=(2,))
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, t, 4), (h, w))
    (3.0 * chunked_cross_entropy(h, w, t, 4)).backward()  # a loss scaler's factor, say
    want = torch.autograd.grad(3.0 * F.cross_entropy(h @ w.t(), t), (h, w))
    torch.testing.assert_close(h.grad, want[0])
    torch.testing.assert_close(w.grad, want[1])


def test_without_gradients_only_the_loss_is_computed():
    h, w, t = _problem()
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, t, 4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t).detach())


def test_every_target_ignored_gives_nan_as_pytorch_does():
    h, w, _ = _problem()
    t = torch.full((h.shape[0],), -100)
    assert torch.isnan(chunked_cross_entropy(h, w, t)) and torch.isnan(F.cross_entropy(h @ w.t(), t))


def test_half_precision_inputs_take_a_float32_softmax():
    h, w, t = _problem(dtype=torch.bfloat16)
    loss = chunked_cross_entropy(h, w, t, 8)
    loss.backward()
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = F.cross_entropy((hr @ wr.t()).float(), t)  # compute_loss's full-logits path
    reference.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad.float(), hr.grad.float(), rtol=0.02, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), wr.grad.float(), rtol=0.02, atol=2e-3)


def test_bad_shapes_and_slices_are_refused_with_the_fix():
    h, w, t = _problem()
    with pytest.raises(ValueError, match="flatten batch and time first"):
        chunked_cross_entropy(h[None], w, t)
    with pytest.raises(ValueError, match="one token id per row"):
        chunked_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="at least one row"):
        chunked_cross_entropy(h, w, t, 0)
    with pytest.raises(ValueError, match="loss_chunk_rows must be ≥ 0"):
        TrainConfig(loss_chunk_rows=-1).validate()


def test_compute_loss_in_slices_equals_the_full_logits_for_a_model_with_every_part():
    """MoE, hybrid and Mamba layers: the auxiliary losses are added, the tied head is trained."""
    torch.manual_seed(0)
    model = MiniFusionForCausalLM(small_config("everything", vocab_size=97))
    inputs, targets = torch.randint(0, 97, (2, 2, 12)).unbind(0)
    runs = []
    for chunk_rows in (0, 5):
        model.zero_grad(set_to_none=True)
        parts = compute_loss(model, inputs, targets, chunk_rows)
        parts.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((parts, grads))
    (full, full_grads), (sliced, sliced_grads) = runs
    torch.testing.assert_close(sliced.lm, full.lm, rtol=0, atol=1e-6)
    torch.testing.assert_close(sliced.total, full.total, rtol=0, atol=1e-6)
    assert float(full.moe_aux.detach()) > 0 and torch.equal(sliced.moe_aux, full.moe_aux)
    assert sliced_grads.keys() == full_grads.keys()
    assert "model.embed_tokens.embed_tokens.weight" in sliced_grads  # the tied head's weight
    for name, grad in full_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compute_loss_in_slices_refuses_another_model_with_the_fix():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    ids = torch.randint(0, 32, (1, 4))
    with pytest.raises(ValueError, match="needs a MiniFusionForCausalLM.*Use 0"):
        compute_loss(llama, ids, ids, chunk_rows=4)


def test_default_slices_grow_with_the_head_but_keep_their_logits_small():
    from minifusion.chunked_loss import MAX_SLICE_BYTES, default_chunk_rows

    assert default_chunk_rows(4096, 128) == 128  # tiny's head: 2**19 weights
    assert default_chunk_rows(8192, 512) == 256  # small's: 2**22 weights, two units
    for vocab, hidden in ((32000, 1024), (32000, 1536), (256000, 4096)):
        rows = default_chunk_rows(vocab, hidden)
        assert rows >= 1 and rows * vocab * 4 <= MAX_SLICE_BYTES < (rows + 1) * vocab * 4

