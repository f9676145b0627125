"""bench/latency.py: argument parsing, the pairs it builds and the JSON it writes (not the timings)."""

from __future__ import annotations

import json

import pytest
import torch

from mslim_core.cost import count_cost
from tests.bench_scripts import load_bench


def test_zoo_entries_and_shapes_parse():
    bench = load_bench("latency")
    assert bench.parse_zoo("resnet56@3x32x32, resnet50@3x224x224,vgg16_bn", (1, 8, 8)) == [
        ("resnet56", (3, 32, 32)), ("resnet50", (3, 224, 224)), ("vgg16_bn", (1, 8, 8))]
    assert bench.parse_zoo("", (3, 32, 32)) == []
    with pytest.raises(SystemExit, match="'3x32' is not C x H x W"):
        bench.parse_shape("3x32")
    with pytest.raises(SystemExit, match="'3xax32' is not C x H x W"):
        bench.parse_shape("3xax32")


def test_block_internal_pairs_keep_the_stage_widths():
    bench = load_bench("latency")
    pairs = bench.pairs_one_shot([("resnet20", (3, 16, 16))], 0.6, [1, 8], ["all", "internal"])
    labels = [p[0] for p in pairs]
    assert labels == ["magnitude resnet20", "magnitude resnet20, round_to 8",
                      "magnitude resnet20, block-internal units", "magnitude resnet20, block-internal units, round_to 8"]
    x = torch.randn(1, 3, 16, 16)
    base = pairs[0][1]
    for label, _, small, _ in pairs:
        ratio = count_cost(small, x).macs / count_cost(base, x).macs
        assert ratio <= 0.61, label
        widths = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
        if "round_to 8" in label:
            pruned = [w for w, w0 in zip(widths, [m.out_channels for m in base.modules()
                                                  if isinstance(m, torch.nn.Conv2d)]) if w != w0]
            assert pruned and all(w % 8 == 0 for w in pruned), label
    # block-internal: the stem and the residual stage widths (16, 32, 64) are untouched
    internal = pairs[2][2]
    assert internal.conv1.out_channels == 16
    stage_outputs = [blk.conv2.out_channels for layer in (internal.layer1, internal.layer2, internal.layer3)
                     for blk in layer]
    assert stage_outputs == [16] * 3 + [32] * 3 + [64] * 3


def test_a_tiny_run_writes_rows_with_the_macs_ratio(tmp_path):
    bench = load_bench("latency")
    out = tmp_path / "latency.json"
    assert bench.main(["--zoo", "resnet20@3x8x8", "--round-to", "1", "--units", "all", "--batches", "1",
                       "--threads", "1", "--rounds", "1", "--seconds", "0", "--min-runs", "1",
                       "--memory-format", "contiguous", "--flops-target", "0.5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python bench/latency.py --zoo resnet20@3x8x8")
    assert data["hardware"]["threads"] == 1 and "cpu_capability" in data["hardware"]
    (row,) = data["rows"]
    assert row["model"] == "magnitude resnet20" and row["batch"] == 1 and row["input"] == [3, 8, 8]
    assert 1.9 < row["ideal"] < 2.2  # MACs ratio of a 0.5 target (within the 0.01 tolerance)
    assert row["speedup"] == pytest.approx(row["base_ms"] / row["pruned_ms"])
    assert row["of_ideal"] == pytest.approx(row["speedup"] / row["ideal"])
