"""bench/moe.py runs at tiny sizes and prints one row per dispatch with ratios to dense."""

from bench.moe import format_table, loop_forward, main, run


def test_loop_equals_grouped_dispatch():
    import torch

    from minifusion.config import MiniFusionConfig
    from minifusion.moe import MoE

    torch.manual_seed(0)
    config = MiniFusionConfig(hidden_size=16, num_attention_heads=2, moe_num_experts=4,
                              moe_top_k=2, moe_intermediate_size=8)  # fmt: skip
    moe = MoE(config)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(loop_forward(moe, x), moe(x).hidden_states, atol=1e-6)


def test_table_and_command_line(capsys):
    seconds = run(tokens=96, hidden_size=16, num_experts=4, expert_size=8, repeats=1)
    assert set(seconds) == {"loop", "grouped", "dense"} and all(v > 0 for v in seconds.values())
    table = format_table(seconds).splitlines()
    assert table[-1].startswith("| dense |") and table[-1].endswith("| 1.00 |")
    main(["--tokens", "96", "--hidden-size", "16", "--experts", "4", "--expert-size", "8",
          "--repeats", "1"])  # fmt: skip
    assert "ratio to dense" in capsys.readouterr().out
