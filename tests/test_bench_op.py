"""benchmarks/bench_op.py runs (smoke, tiny timing budget) for each probe setting, stacked probes included."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_op  # noqa: E402


@pytest.mark.parametrize("probe", ["all", "none", "stacked"])
def test_bench_op_writes_results(probe, tmp_path):
    bench_op.main(["--shapes", "smollm2", "--batches", "3", "--fracs", "0.5", "--providers", "reference", "cpp", "op",
                   "--probe", probe, "--min-run-time", "0.01", "--out-dir", str(tmp_path), "--tag", "t"])
    rows = list(csv.DictReader(open(tmp_path / "bench_op_t.csv")))
    provs = {r["provider"] for r in rows}
    assert {"reference", "op"} <= provs and all(float(r["median_us"]) > 0 for r in rows)
    assert f"probe_mask={probe}" in (tmp_path / "bench_op_t.md").read_text()
    inp, n_lat = bench_op.make_inputs(64, 100, 4, 0.5, device="cpu", rank=4, F=8, logits_dtype=bench_op.DTYPES["fp32"],
                                      hidden_dtype=bench_op.DTYPES["fp32"], u_dtype=bench_op.DTYPES["fp32"], probe=probe)
    assert n_lat == 2 and ("row_probe" in inp) == (probe == "stacked")
    if probe == "stacked":
        assert inp["W1"].shape == (2, 8, 64) and inp["row_probe"].tolist() == [0, 1, 0, 1]
