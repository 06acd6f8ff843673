"""The README's first command runs: the model demo, on a short token list."""

import re

from fcpass import demo


def test_model_demo_prints_report_decisions_and_equal_outputs(capsys):
    demo.main(["--tokens", "7,64", "--threshold", "16"])
    out = capsys.readouterr().out
    assert "no matmul producer" in out and "no matmul consumer" in out
    assert "mm_reduce_scatter 4 = 2 per layer x 2" in out and "all_gather_mm 4 = 2 per layer x 2" in out
    assert "Compilations per rank (without / with fcpass): 1 / 1" in out
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\s+(\d+)\s+\d+\s+(?:un)?fused x4.*$", out, re.M)}
    assert "unfused x4     unfused x4" in rows[7] and "fused x4       fused x4" in rows[64]
    diffs = [float(row.split()[-3]) for row in rows.values()]
    assert max(diffs) <= 1e-5 and "ranks disagree" not in out
