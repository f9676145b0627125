"""examples/yolo_elan: ResRep in a YOLO-style loop (AMP + GradScaler, momentum warm-up, EMA, round_to 8, ONNX)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from mslim_resrep import COMPACTOR_GROUP

import mslim
from mslim.models import create

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "yolo_elan" / "train_resrep_yolo.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_resrep_yolo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory: pytest.TempPathFactory):
    script = _script()
    args = script.parse_args(["--iters", "16", "--img_size", "64", "--batch_size", "4", "--num_images", "16",
                              "--amp", "fp16", "--out", str(tmp_path_factory.mktemp("yolo"))])
    return args, script.run(args)


def test_finalized_widths_are_multiples_of_8_and_reach_the_target(yolo_run) -> None:
    args, result = yolo_run
    report = result.report
    assert report.flops_ratio <= args.flops_target  # the schedule counts MACs as finalize rounds them
    changed = {name: w for name, w in report.layer_widths.items() if w[1] != w[0]}
    assert len(changed) > 10
    assert all(after % 8 == 0 for _, after in changed.values())
    for name, (_, after) in report.layer_widths.items():
        assert result.small.get_submodule(name).out_channels == after


def test_finalized_model_computes_what_the_ema_model_computes(yolo_run) -> None:
    _, result = yolo_run
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = result.ema.module.cpu().eval()(x)
        got = result.small.eval()(x)
    for w, g in zip(want, got):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()
    # the EMA holds exactly the zero rows ResRep zeroed, so nothing it computes is lost
    zero_rows = sum(int((result.ema.module.get_submodule(u.compactor_path).weight.flatten(1).abs().amax(1) == 0).sum())
                    for u in result.session.pruner.units)
    assert zero_rows == result.session.pruner.zeroed_rows() > 0
    # the saved file loads onto a fresh model and gives the same outputs
    loaded = mslim.load(result.files["model"], model=lambda: create("yolo_elan", num_classes=10))
    with torch.no_grad():
        for a, b in zip(loaded.eval()(x), got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_warm_up_kept_compactor_momentum_and_amp_used_a_scaler(yolo_run) -> None:
    args, result = yolo_run
    momenta = {g["name"]: g["momentum"] for g in result.optimizer.param_groups}
    assert momenta[COMPACTOR_GROUP] == 0.99
    assert all(m == args.momentum for name, m in momenta.items() if name != COMPACTOR_GROUP)
    state = torch.load(result.files["checkpoint"], weights_only=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 1.0
    assert state["session"]["algorithm"] == "resrep"


def test_onnx_export(yolo_run) -> None:
    pytest.importorskip("onnx")
    import onnx

    _, result = yolo_run
    graph = onnx.load(str(result.files["onnx"])).graph
    assert [o.name for o in graph.output] == ["output0", "output1", "output2"]
