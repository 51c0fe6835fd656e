"""bench/attention.py runs and prints a table with ratios to full attention (tiny sizes)."""

from bench.attention import format_table, main, run


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
