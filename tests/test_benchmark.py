"""Smoke test of the benchmark script (it measures; nothing here asserts timings)."""

import json
import warnings

import torch
from benchmark import MIN_REPEATS, main


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


def test_benchmark_resnet_row_records_routes(tmp_path):
    """A ResNet-sized row through the CLI: ``--resnet`` picks the rows, and
    each K-FOC convolution solve records its route."""
    from kfoc_backpack.enums import Route

    args = ["--resnet", "--models", "conv128", "--batch-sizes", "2", "--skip-ops"]
    records = main([*args, "--repeats", str(MIN_REPEATS), "--warmup", "0", "--out", str(tmp_path)])
    assert {(r["model"], r["batch_size"]) for r in records} == {("conv128", 2)}
    for r in records:
        assert r["ops"] is None and r["median_ms"] > 0
        if r["method"].startswith("KFOC"):
            conv = [v for k, v in r["routes"].items() if "Conv2d" in k]
            assert len(conv) == 1 and conv[0] in Route.values()


def test_resnet18_has_resnet18_convolutions():
    from benchmark import resnet18
    from torch import nn

    model = resnet18()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 17  # stem + 16 in the blocks (no skips, so no 1x1 projections)
    assert [c.out_channels for c in convs[1::4]] == [64, 64, 128, 128, 256, 256, 512, 512][::2]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
