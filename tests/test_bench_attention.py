"""bench/attention.py runs and prints a table with ratios to full attention (tiny sizes), and
its exact tensor count shows what local heads hold beyond full attention."""

from bench.attention import format_table, main, measure, run


def test_table_has_one_row_per_length_and_unit_ratio_baseline():
    results = run((64, 160), hidden_size=32, num_heads=4, num_kv_heads=2, window=16, repeats=1)
    assert {(m.pattern, m.seq_len) for m in results} == {
        (p, n) for p in ("full", "local", "mixed") for n in (64, 160)
    }
    assert all(m.seconds > 0 for m in results)
    table = format_table(results).splitlines()
    assert table[0].startswith("| T |") and "local/full time" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["64", "160"]


def test_command_line(capsys):
    main(["--seq-lens", "64", "--hidden-size", "32", "--window", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| 64 |" in out and "local/full time" in out


def test_exact_tensor_bytes_local_heads_add_no_term_that_grows_with_length():
    """Local heads keep no T × T (or T × window) tensor: what they hold beyond full causal
    attention — one kernel call's band output and the band mask — is the same at every length,
    while full attention's own tensors grow in proportion to T (its flash kernel is linear)."""
    sizes = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window=64, repeats=1)
    by_length = {n: {p: measure(p, n, **sizes) for p in ("full", "local")} for n in (2048, 4096)}
    extra = {n: r["local"].tensor_peak_bytes - r["full"].tensor_peak_bytes
             for n, r in by_length.items()}  # fmt: skip
    assert extra[2048] == extra[4096] > 0
    full = {n: r["full"].tensor_peak_bytes for n, r in by_length.items()}
    assert 1.95 < full[4096] / full[2048] < 2.05
    # at least q, k, v and the output of every position (float32), alive for the backward pass
    q_and_out, k_and_v = 2 * 4 * 8 * 4, 2 * 2 * 8 * 4  # bytes per position: heads × head_dim × 4
    assert full[4096] >= 4096 * (q_and_out + k_and_v)
    table = format_table([m for r in by_length.values() for m in r.values()] + [
        measure("mixed", n, **sizes) for n in (2048, 4096)])
    assert "local/full tensors" in table.splitlines()[0]
