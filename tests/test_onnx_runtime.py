"""mslim.onnx_runtime and the onnxruntime latency runtime: outputs, timings and errors (CLI wiring: test_cli_verbs)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import mslim
from mslim import pipeline
from mslim.latency import deploy_form, measure_latency
from mslim.models import create
from mslim.onnx_runtime import OnnxRuntimeModel, onnxruntime_model
from mslim_core.errors import ConfigError, MslimError

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def pruned_pair():
    torch.manual_seed(0)
    base = create("resnet20", in_channels=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = mslim.prune(create("resnet20", in_channels=1).eval(), algo="magnitude",
                               example_inputs=torch.randn(2, *SHAPE), flops_target=0.5)
    return base, small.eval()


def test_a_pruned_model_runs_in_onnxruntime_with_the_torch_outputs(pruned_pair):
    _, small = pruned_pair
    x = torch.randn(5, *SHAPE)
    session = onnxruntime_model(deploy_form(small, x), x[:1], threads=1)
    with torch.no_grad():
        expected = small(x)
    got = session(x)  # batch 5 through a model exported with batch 1: the batch dimension is dynamic
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(session, OnnxRuntimeModel) and session.threads == 1 and session.input_name == "input"


def test_latency_in_onnxruntime_is_timed_per_batch_size(pruned_pair):
    base, _ = pruned_pair
    times = measure_latency(deploy_form(base, torch.randn(1, *SHAPE)), SHAPE, (1, 3), threads=1, min_runs=4,
                            min_seconds=0.0, warmup=1, runtime="onnxruntime")
    assert set(times) == {1, 3}
    for batch, lat in times.items():
        assert lat.batch == batch and lat.threads == 1 and lat.runs >= 4
        assert 0 < lat.min_ms <= lat.median_ms


def test_a_session_built_beforehand_is_timed_as_it_is(pruned_pair):
    base, _ = pruned_pair
    session = onnxruntime_model(base, torch.randn(1, *SHAPE), threads=1)
    (lat,) = measure_latency(session, SHAPE, (2,), threads=1, min_runs=2, min_seconds=0.0, warmup=0).values()
    assert lat.batch == 2 and lat.runs >= 2
    with pytest.raises(MslimError, match=r"built with 1 threads, but threads=2 was asked for"):
        measure_latency(session, SHAPE, (1,), threads=2)


def test_bad_runtime_settings_name_what_is_allowed(pruned_pair):
    base, _ = pruned_pair
    with pytest.raises(MslimError, match=r"runtime must be one of torch, onnxruntime; got 'tvm'"):
        measure_latency(base, SHAPE, (1,), runtime="tvm")
    with pytest.raises(MslimError, match="channels_last applies to the torch runtime only"):
        measure_latency(base, SHAPE, (1,), runtime="onnxruntime", channels_last=True)
    with pytest.raises(MslimError, match="threads must be a positive integer, got 0"):
        onnxruntime_model(base, torch.randn(1, *SHAPE), threads=0)
    with pytest.raises(MslimError, match="needs one example input tensor, got tuple"):
        onnxruntime_model(base, (torch.randn(1, *SHAPE),), threads=1)


class _TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


def test_a_model_with_two_outputs_is_refused():
    with pytest.raises(MslimError, match="one input and one output; this one has 1 inputs and 2 outputs"):
        onnxruntime_model(_TwoOutputs(), torch.randn(1, 3), threads=1)


def test_a_missing_onnxruntime_says_how_to_install_it_before_any_training(monkeypatch, pruned_pair):
    base, _ = pruned_pair
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MslimError, match=r"needs the onnxruntime package, which is not installed: "
                                         r"pip install 'mslim\[deploy\]'"):
        onnxruntime_model(base, torch.randn(1, *SHAPE))
    spec = pipeline.RunSpec(algo="magnitude", latency_runtime="onnxruntime")
    with pytest.raises(ConfigError, match=r"pip install 'mslim\[deploy\]'"):
        spec.validate()
    pipeline.RunSpec(algo="magnitude", latency_runtime="onnxruntime", measure_latency=False).validate()


def test_run_spec_checks_the_latency_runtime():
    with pytest.raises(ConfigError, match=r"latency_runtime must be one of torch, onnxruntime; got 'ort'"):
        pipeline.RunSpec(algo="magnitude", latency_runtime="ort").validate()
    with pytest.raises(ConfigError, match="channels_last applies to the torch latency runtime only"):
        pipeline.RunSpec(algo="magnitude", latency_runtime="onnxruntime", channels_last=True).validate()


def test_the_channel_block_follows_the_cpu_capability(monkeypatch):
    from mslim.latency import channel_block

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert channel_block() == 16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert channel_block() == 8
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert channel_block() == 8
