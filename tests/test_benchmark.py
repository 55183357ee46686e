"""Smoke test of the benchmark script (it measures; nothing here asserts timings)."""

import json
import warnings

from integration.benchmark import MIN_REPEATS, main


def test_benchmark_quick_writes_records(tmp_path):
    args = ["--models", "lenet5", "--batch-sizes", "4", "--repeats", str(MIN_REPEATS)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = main([*args, "--warmup", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved == records
    methods = {r["method"] for r in records}
    assert methods == {"none", "KFAC", "KFLR", "KFOC", "KFOCExact"}
    for r in records:
        assert set(r) >= {"model", "batch_size", "device", "method", "median_ms", "peak_mem_mb"}
        assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0
        assert r["ops"] > 0 and r["ops_accelerator_routes"] > 0
        if r["method"].startswith("KFOC"):
            assert len(r["iterations_per_layer"]) == 5  # 2 conv + 3 linear layers
    # main() hides BackPACK's uninformative hook warning (it came once per step)
    assert not any("Full backward hook" in str(w.message) for w in caught)
