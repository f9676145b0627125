"""bench/latency.py: argument parsing, the pairs it builds and the JSON it writes (not the timings)."""

from __future__ import annotations

import json

import pytest
import torch

from mslim.models import create
from mslim_core.cost import CostModel, count_cost
from mslim_core.graph import ChannelGraph
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


def test_onnxruntime_rows_are_timed_from_exported_models(tmp_path):
    bench = load_bench("latency")
    out = tmp_path / "latency.json"
    assert bench.main(["--zoo", "resnet20@1x8x8", "--round-to", "1", "--units", "all", "--batches", "1", "2",
                       "--threads", "1", "--rounds", "1", "--seconds", "0", "--min-runs", "1",
                       "--runtime", "both", "--memory-format", "channels_last", "--flops-target", "0.5",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runtime"], r["memory_format"], r["batch"]) for r in rows] == [
        ("torch", "channels_last", 1), ("torch", "channels_last", 2), ("onnxruntime", None, 1), ("onnxruntime", None, 2)]
    assert all(r["base_ms"] > 0 and r["pruned_ms"] > 0 for r in rows)


def test_width_sweep_samples_allocations_at_the_target_and_times_them(tmp_path):
    sweep = load_bench("width_sweep")
    base = create("resnet20", in_channels=1).eval()
    x = torch.randn(1, 1, 8, 8)
    graph = ChannelGraph(base, x)
    cost = CostModel(base, x, graph.units)
    widths = sweep.sample_widths(cost, 0.5, 0.02, 8, 5, torch.Generator().manual_seed(0))
    assert len(widths) == 5 and len(torch.unique(widths, dim=0)) == 5
    full = cost.initial_widths()
    assert bool(((widths % 8 == 0) | (widths == full)).all()) and bool((widths <= full).all())
    ratios = cost.macs(widths).double() / cost.macs(full)
    assert bool(((ratios - 0.5).abs() <= 0.02).all())
    small = sweep.build(base, x, [u.name for u in graph.units], widths[0])
    assert count_cost(small, x).macs == cost.macs(widths[0])  # the engine builds exactly the sampled widths
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)

    out = tmp_path / "sweep.json"
    assert sweep.main(["--zoo", "resnet20@1x8x8", "--flops-target", "0.5", "--tolerance", "0.02", "--samples", "2",
                       "--runtime", "torch-contiguous", "onnxruntime", "--batches", "1", "--threads", "1",
                       "--rounds", "1", "--seconds", "0", "--min-runs", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python bench/width_sweep.py --zoo resnet20@1x8x8")
    assert sorted({(r["allocation"], r["runtime"]) for r in data["rows"]}) == [
        (0, "onnxruntime"), (0, "torch-contiguous"), (1, "onnxruntime"), (1, "torch-contiguous")]
    assert all(1.85 < r["ideal"] < 2.2 for r in data["rows"])
    with pytest.raises(SystemExit, match="no allocation of resnet20 in multiples of 64"):
        sweep.main(["--zoo", "resnet20@1x8x8", "--round-to", "64", "--tolerance", "0.001", "--out", str(out)])


def test_width_sweep_takes_one_model():
    sweep = load_bench("width_sweep")
    with pytest.raises(SystemExit, match="--zoo takes one NAME@CxHxW entry, got 'resnet20,resnet56'"):
        sweep.main(["--zoo", "resnet20,resnet56"])


def _saved_pair(folder):
    import mslim

    base = create("resnet20", in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    small, report = mslim.prune(create("resnet20", in_channels=1).eval(), algo="magnitude", example_inputs=x,
                                flops_target=0.6)
    report = report.model_copy(update={"extra": {"zoo_model": {"model": "resnet20", "num_classes": 10,
                                                               "in_channels": 1, "input_shape": [1, 8, 8]}}})
    folder.mkdir()
    mslim.save(small, folder / "magnitude.mslim", report=report, example_inputs=x)
    mslim.save(base, folder / "base.mslim", report=report, example_inputs=x)


def test_saved_models_are_timed_at_their_own_or_a_given_input_size(tmp_path):
    bench = load_bench("latency")
    _saved_pair(tmp_path / "models")
    ((label, base, small, shape),) = bench.pairs_from_folder(tmp_path / "models")
    assert label == "magnitude (models)" and shape == (1, 8, 8)
    ((_, _, small, shape),) = bench.pairs_from_folder(tmp_path / "models", (1, 24, 24))
    assert shape == (1, 24, 24) and small(torch.randn(2, 1, 24, 24)).shape == (2, 10)
    with pytest.raises(SystemExit, match="--models-input 3x24x24 has 3 channels, but the models in .* take 1"):
        bench.pairs_from_folder(tmp_path / "models", (3, 24, 24))
