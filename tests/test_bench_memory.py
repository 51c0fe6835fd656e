"""bench/memory.py's exact count of live tensor bytes: what it counts and when it stops."""

import torch

from bench.memory import LiveTensorBytes


def test_live_tensor_bytes_counts_new_storages_until_they_are_freed():
    with LiveTensorBytes() as count:
        x = torch.empty(1_000_000)  # 4,000,000 bytes of fp32
        assert count.live == 4_000_000
        view = x.view(1000, 1000)
        view.mul_(0)  # a view and an in-place write: no new storage
        del x
        assert count.live == 4_000_000  # the view still holds the storage
        doubled = view * 2
        assert count.live == 8_000_000
        del view
        assert count.live == 4_000_000
    assert count.peak == 8_000_000 and count.live_after == 4_000_000
    del doubled
    assert count.live == 0


def test_live_tensor_bytes_sees_the_backward_pass_and_ignores_older_tensors():
    weight = torch.randn(64, 64, requires_grad=True)  # made before the block: not counted
    with LiveTensorBytes() as count:
        (torch.randn(8, 64) @ weight).square().sum().backward()
    assert weight.grad is not None
    assert count.live_after == weight.grad.untyped_storage().nbytes() == 64 * 64 * 4
    assert count.peak >= 2 * 8 * 64 * 4  # the input and the product, at least
