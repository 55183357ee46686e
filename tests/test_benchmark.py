"""Smoke test of the benchmark script (it measures; nothing here asserts timings)."""

import json

from integration.benchmark import main


def test_benchmark_quick_writes_records(tmp_path):
    args = ["--models", "lenet5", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0"]
    records = main([*args, "--out", str(tmp_path)])
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
