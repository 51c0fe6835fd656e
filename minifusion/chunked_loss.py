"""Chapter 12 — next-token cross-entropy without the ``(tokens, vocab)`` logits.

A language model's last step turns every position's hidden state ``h`` (``H`` numbers) into one
score per vocabulary entry, ``z = h Wᵀ`` (``V`` numbers), and the loss is
``logsumexp(z) − z[target]``. Written the plain way, the whole ``(N, V)`` matrix of logits
exists at once — and autograd keeps it, its log-softmax and their gradients. With few layers or
a large vocabulary that matrix is among the biggest tensors of a training step: ``tiny``
(V = 4,096) holds 16 MiB of fp32 logits per 1,024 tokens, and a preset with V = 32,000 at
8 × 2,048 tokens almost 2 GiB (16,384 × 32,000 × 4 bytes) for them alone.

The loss and its gradient only ever need one row of logits at a time. Per row,
``∂loss/∂z = softmax(z) − onehot(target)``, so ``∂loss/∂h = (softmax(z) − onehot) W`` and
``∂loss/∂W = Σ_rows (softmax(z) − onehot)ᵀ h``. :func:`chunked_cross_entropy` walks the rows in
slices of ``chunk_rows`` (by default 128 for a small head, more for a large one:
:func:`default_chunk_rows`): for each slice it computes the logits, adds the slice's loss, turns
the logits into their gradient in place and multiplies that straight into the gradients of ``h``
and ``W`` — then drops the slice. Nothing of size ``N × V`` is ever held, and for a small head
every pass over a slice's logits runs in cache instead of main memory. The same idea is the
"fused linear cross-entropy" of Liger Kernel (Hsu et al., 2024) and Cut Cross-Entropy (Wijmans
et al., 2024).

The gradients are computed during the forward pass (they need the slice's logits, which are then
gone) and handed out by ``backward`` scaled by the incoming gradient; under ``torch.no_grad()``
or for inputs that need no gradient it computes only the loss. Targets equal to ``ignore_index`` are skipped and
the mean is over the scored rows, as in :func:`torch.nn.functional.cross_entropy`.

Use it through :func:`minifusion.training.compute_loss` (``chunk_rows=``) or the training setting
``loss_chunk_rows`` (``--set train.loss_chunk_rows=128``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ROWS = 128  # for heads of up to 2**21 weights (tiny's: 4,096 × 128)
MAX_SLICE_BYTES = 32 * 2**20  # a slice's fp32 logits: at most this much
IGNORE_INDEX = -100


def default_chunk_rows(vocab_size: int, hidden_size: int) -> int:
    """Rows per slice: 128 times the head's size in units of 2**21 weights, as long as a slice's
    fp32 logits stay within 32 MiB.

    Every slice adds its product into the whole ``(V, H)`` weight gradient, so a large head
    wants fewer, taller slices; the cap keeps the memory saving. Measured with ``python -m
    bench.loss`` on this project's 2-core CPU: a 4,096 × 128 head was fastest in slices of 128
    rows (0.52× the full-logits time; 0.55–0.61× at 256–1,024), a 32,000 × 1,024 head took 1.10×
    in slices of 128 and 0.97–1.00× in slices of 256–1,024.
    """
    units = -(-vocab_size * hidden_size // 2**21)  # ceiling division
    return max(1, min(DEFAULT_CHUNK_ROWS * units, MAX_SLICE_BYTES // (4 * vocab_size)))


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision logits (as ``compute_loss`` upcasts them); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``(hidden (N, H), weight (V, H), targets (N,))`` → the mean loss over scored rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, ignore_index: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scored = targets != ignore_index
        count = int(scored.sum())
        total = torch.zeros((), dtype=_softmax_dtype(hidden.dtype), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=total.dtype) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, target, keep = hidden[rows], targets[rows], scored[rows]
            safe_target = torch.where(keep, target, 0)[:, None]  # any valid index: masked below
            logits = (h @ weight.t()).to(total.dtype)  # (rows, V): the only slice-sized tensor
            log_norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_target).squeeze(1)
            total += torch.where(keep, log_norm - picked, 0).sum()
            if not (want_hidden or want_weight):
                continue
            # The gradient of the slice's loss with respect to its logits, built in place:
            # softmax − one-hot, zero for ignored rows, divided by the number of scored rows.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_target, -keep[:, None].to(total.dtype))
            grad_logits.mul_((keep.to(total.dtype) / max(count, 1))[:, None])
            grad_logits = grad_logits.to(h.dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight:
                if h.dtype == grad_weight.dtype:  # accumulate in place: no (V, H) temporary
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight += (grad_logits.t() @ h).to(grad_weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        # An empty mean is NaN, as in F.cross_entropy when every target is ignored.
        return total / count if count else total * float("nan")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # A copy, not in place: a second backward (retain_graph, gradcheck) reads them again.
        grads = [None if g is None else (g * grad_loss).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]  # fmt: skip
        return *grads, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` computed ``chunk_rows`` rows at a time
    (``None``: :func:`default_chunk_rows` of the head).

    ``hidden`` is ``(N, H)`` (flatten batch and time first), ``weight`` the output head's
    ``(V, H)``, ``targets`` ``(N,)`` token ids (``ignore_index`` rows are not scored). Returns the
    mean loss over the scored rows, a scalar; its gradients reach ``hidden`` and ``weight``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)} must be (N, H) and weight "
            f"{tuple(weight.shape)} (V, H) with the same H; flatten batch and time first "
            "(hidden.flatten(0, 1), targets.flatten())."
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_cross_entropy: targets {tuple(targets.shape)} must be ({hidden.shape[0]},), "
            "one token id per row of hidden."
        )
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(*weight.shape)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: a slice needs at least one row.")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, int(chunk_rows), int(ignore_index))
