"""The bad-input matrix of docs/reliability.md: each row gets a specific error or warning, no file is lost.

Rows whose behaviour belongs to a plugin that does not provide it yet are strict xfails that
state the expected behaviour (docs/reliability.md lists them).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mslim
from mslim.data import TensorLoader, load_dataset
from mslim.models import create, example_input
from mslim.training import fit, load_training_checkpoint
from mslim_core import CheckpointError, DataError, GraphError, MslimWarning, TargetNotReachedWarning, TrainingError
from mslim_core.checkpoint import load_checkpoint, save_checkpoint
from mslim_core.graph import ChannelGraph


def _algorithm(name: str) -> str:
    if name not in {a.name for a in mslim.algorithms()}:
        pytest.skip(f"algorithm {name!r} is not installed")
    return name


def _algorithms() -> list[str]:
    return sorted(a.name for a in mslim.algorithms())


# -- row 1: wrong example input shape ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 4, 32, 32)])
def test_wrong_example_input_shape_names_the_shape(shape: tuple[int, ...], tmp_path: Path) -> None:
    model = create("resnet20")
    bad = torch.randn(shape)
    shown = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    for algo in _algorithms():
        with pytest.raises(GraphError, match=rf"the model failed on example_inputs of shape {shown}"):
            mslim.prepare(model, algo=algo, example_inputs=bad)
    with pytest.raises(GraphError, match=rf"could not trace the model on example inputs of shape {shown}"):
        ChannelGraph(model, bad)
    with pytest.raises(GraphError, match=rf"example_inputs of shape {shown}"):
        mslim.save(model, tmp_path / "m.mslim", example_inputs=bad)
    assert not (tmp_path / "m.mslim").exists()


def test_example_inputs_that_are_not_tensors() -> None:
    with pytest.raises(GraphError, match="example_inputs must be a tensor shaped like one batch"):
        ChannelGraph(create("resnet20"), [[1.0, 2.0]])


# -- row 2: a model with no prunable layers ------------------------------------------------------


def _unprunable() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3))  # only the output layer


def test_graph_of_a_model_without_prunable_layers_says_why() -> None:
    graph = ChannelGraph(_unprunable(), torch.randn(2, 3, 8, 8))
    assert graph.units == []
    assert "model outputs" in graph.skipped["2"]
    with pytest.raises(GraphError, match=r"layer '2' cannot be pruned: its channels are model outputs"):
        graph.unit("2")


def test_resrep_refuses_a_model_without_prunable_layers() -> None:
    algo = _algorithm("resrep")
    with pytest.raises(GraphError, match=r"found no conv it can put a compactor after .*model outputs"):
        mslim.prepare(_unprunable(), algo=algo, example_inputs=torch.randn(2, 3, 8, 8))


@pytest.mark.filterwarnings("ignore::mslim_core.errors.TargetNotReachedWarning")
def test_one_shot_pruner_refuses_a_model_without_prunable_layers() -> None:
    algo = _algorithm("magnitude")
    with pytest.raises(GraphError, match="no prunable layer"):
        mslim.prune(_unprunable(), algo=algo, example_inputs=torch.randn(2, 3, 8, 8), flops_target=0.5)


# -- row 3: every channel scored zero ------------------------------------------------------------


def test_all_zero_scores_warn() -> None:
    algo = _algorithm("magnitude")
    model = create("resnet20")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
    with pytest.warns(MslimWarning, match="scored zero"):
        mslim.prune(model, algo=algo, example_inputs=example_input("resnet20"), flops_target=0.5)


# -- row 4: NaN/inf gradients during training -----------------------------------------------------


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_nan_gradient_stops_training_at_its_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    model = _small_model()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    loader = TensorLoader(images, torch.randint(0, 4, (32,), generator=g), 8, seed=0)  # 4 batches per epoch
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 6 else grad  # iteration 5: epoch 2, batch 1

    model[0].weight.register_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite gradient at iteration 5 \(epoch 2, batch 1\): the first "
                                            r"layer with a NaN/inf gradient is '0' \(parameter '0\.weight'\)"):
        fit(model, loader, epochs=3, out_dir=tmp_path, progress=False)
    state = load_training_checkpoint(tmp_path / "last.pt")  # epoch 1's checkpoint is intact
    assert state["iteration"] == 4
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


# -- row 5: flops_target unreachable --------------------------------------------------------------


def test_magnitude_target_unreachable_under_min_channels_warns() -> None:
    algo = _algorithm("magnitude")
    with pytest.warns(TargetNotReachedWarning, match=r"FLOPs target 0\.2 not reachable: .*min_channels=16"):
        mslim.prune(create("resnet20"), algo=algo, example_inputs=example_input("resnet20"), flops_target=0.2,
                    min_channels=16)


def _resrep_steps(session, steps: int) -> None:
    opt = session.optimizer(lr=0.01)
    for _ in range(steps):
        session.model(torch.randn(2, 3, 32, 32)).sum().backward()
        session.after_backward()
        opt.step()
        opt.zero_grad()
        session.step()


def test_resrep_target_unreachable_under_num_at_least_warns_at_finalize() -> None:
    algo = _algorithm("resrep")
    session = mslim.prepare(create("resnet20"), algo=algo, example_inputs=example_input("resnet20"),
                            flops_target=0.3, num_at_least=16)
    _resrep_steps(session, 2)
    with pytest.warns(TargetNotReachedWarning, match=r"FLOPs ratio 1\.0000 is above flops_target 0\.3"):
        _, report = session.finalize()
    assert report.flops_ratio == 1.0 and report.warnings


def test_resrep_target_unreachable_under_num_at_least_warns_at_prepare() -> None:
    algo = _algorithm("resrep")
    with pytest.warns(TargetNotReachedWarning, match="num_at_least"):
        mslim.prepare(create("resnet20"), algo=algo, example_inputs=example_input("resnet20"),
                      flops_target=0.3, num_at_least=16)


# -- row 6: an empty data folder ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("cifar10", r"cifar10: expected data_batch_1, .* missing: data_batch_1"),
        ("cifar100", r"cifar100: "),
        ("folder", r"folder: .* is empty or holds no class folders"),
    ],
)
def test_empty_data_folder_is_a_data_error(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(f"{kind}:{tmp_path}")
    assert list(tmp_path.iterdir()) == []  # nothing written into the user's folder


def test_missing_data_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")


# -- row 7: a checkpoint from another model -------------------------------------------------------


def test_model_file_from_another_model(tmp_path: Path) -> None:
    mslim.save(create("resnet20"), tmp_path / "r20.mslim")
    with pytest.raises(CheckpointError, match="another model"):
        mslim.load(tmp_path / "r20.mslim", model=create("resnet56"))
    assert (tmp_path / "r20.mslim").exists()


def test_training_checkpoint_from_another_model(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", create("resnet20"))
    other = create("vgg16_bn")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no partial load with a warning: a clean refusal
        with pytest.raises(CheckpointError, match=r"does not fit the given model \(the file is from a .*CifarResNet"):
            load_checkpoint(path, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
