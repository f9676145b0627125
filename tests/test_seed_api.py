"""The seed document's ResRep API (``mslim.algorithms.pytorch.prune.Resrep_pruner``) over the session."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslim
from mslim.algorithms.pytorch.prune.Resrep_pruner import (
    CompactorMaskDict,
    ResRep,
    Resrep_1,
    Resrep_2,
    calculate_model_flops,
)
from mslim.models import create
from mslim_core.errors import ConfigError, GraphError, MslimError, MslimWarning


BATCH, NUM_IMAGES, EPOCHS = 8, 40, 8  # 5 iterations per epoch, 40 in all
_X = torch.randn(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
_Y = torch.randint(0, 10, (NUM_IMAGES,), generator=torch.Generator().manual_seed(2))


def _opt(**extra) -> argparse.Namespace:
    """The seed scripts' argparse namespace (only the fields the ResRep API reads)."""
    fields = {"flops_target": 0.5, "lasso_strength": 1e-3, "batch_size": BATCH, "epochs": EPOCHS,
              "img_size": [32, 32], "mask_interval": 2}
    fields.update(extra)
    return argparse.Namespace(**fields)


def _base_model() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20")


def _batches():
    for epoch in range(EPOCHS):
        for i in range(NUM_IMAGES // BATCH):
            yield epoch, _X[i * BATCH:(i + 1) * BATCH], _Y[i * BATCH:(i + 1) * BATCH]


def _seed_run(opt: argparse.Namespace):
    """The seed document's snippet, with the optimizer step it needs."""
    model = _base_model()
    iteration = 0
    ResRep_object = ResRep(copy.deepcopy(model))
    model = ResRep_object.wrapped_model
    dummy_input = torch.randn([1, 3, opt.img_size[0], opt.img_size[0]])
    ResRep_object.original_flops = calculate_model_flops(model, dummy_input, ResRep_object)
    optimizer = ResRep_object.sgd_optimizer(0.9, lr=0.05)
    returned = []
    for epoch, inputs, target in _batches():
        model, iteration, compactor_mask_dict = Resrep_1(opt, iteration, model, ResRep_object, epoch, NUM_IMAGES)
        returned.append(iteration)
        loss = F.cross_entropy(model(inputs), target)
        loss.backward()
        Resrep_2(opt, compactor_mask_dict)
        optimizer.step()
        optimizer.zero_grad()
    # the schedule step of the last iteration runs at the start of the next one
    model, iteration, compactor_mask_dict = Resrep_1(opt, iteration, model, ResRep_object, EPOCHS, NUM_IMAGES)
    return ResRep_object, returned, compactor_mask_dict


def _native_run():
    """The same training through mslim.prepare and the session, as docs/algorithms/resrep.md shows it."""
    model = _base_model()
    session = mslim.prepare(model, "resrep", example_inputs=torch.randn(1, 3, 32, 32), flops_target=0.5,
                            lasso_strength=1e-3, mask_interval=2)
    session.pruner.plan(EPOCHS * NUM_IMAGES // BATCH, NUM_IMAGES // BATCH)
    optimizer = session.optimizer(lr=0.05, momentum=0.9)
    for _, inputs, target in _batches():
        optimizer.zero_grad()
        F.cross_entropy(session.model(inputs), target).backward()
        session.after_backward()
        optimizer.step()
        session.step()
    return session


def test_seed_snippet_trains_exactly_like_the_session() -> None:
    obj, returned, mask_dict = _seed_run(_opt())
    session = _native_run()
    total = EPOCHS * NUM_IMAGES // BATCH
    assert returned == list(range(1, total + 1))
    assert obj.session.iteration == session.iteration == total
    # the warm-up is 5 epochs of num_images / batch_size, capped by the planned short schedule
    assert obj.pruner.config.iters_per_epoch == NUM_IMAGES // BATCH
    assert obj.pruner.config.total_iters == total
    assert obj.pruner.schedule == session.pruner.schedule
    # same masks, and masking happened several times, then the masked rows reached zero
    assert obj.pruner.masked_rows() > 0 and obj.pruner.zeroed_rows() == obj.pruner.masked_rows()
    assert torch.equal(obj.pruner._masked_at, session.pruner._masked_at)
    seed_state, native_state = obj.wrapped_model.state_dict(), session.model.state_dict()
    assert seed_state.keys() == native_state.keys()
    for key in seed_state:
        torch.testing.assert_close(seed_state[key], native_state[key], rtol=0, atol=1e-6, msg=key)
    # the returned dict: compactor weight -> its mask broadcast to the weight's shape
    assert isinstance(mask_dict, CompactorMaskDict) and mask_dict.owner is obj
    masks = obj.pruner.masks()
    assert len(mask_dict) == len(masks) == len(obj.pruner.units)
    for (weight, mask), (name, compactor) in zip(mask_dict.items(), obj.pruner.compactors.items()):
        assert weight is compactor.weight and mask.shape == weight.shape
        assert torch.equal(mask[:, :, 0, 0], masks[name][:, None].expand(-1, weight.shape[1]))
    _, report = obj.finalize()
    assert report.flops_ratio <= 0.5 and report.extra["max_output_rel_diff"] < 1e-5


def test_resrep_2_applies_mask_and_lasso_to_the_gradients() -> None:
    opt = _opt(lasso_strength=0.01)
    obj = ResRep(_base_model(), example_inputs=torch.randn(1, 3, 32, 32))
    model = obj.wrapped_model
    obj.pruner.update_masks(0)  # mask a few rows now
    with torch.no_grad():  # rows of different norms, one of them exactly zero
        first = next(iter(obj.pruner.compactors.values()))
        first.weight.mul_(torch.linspace(0.5, 2.0, first.weight.shape[0]).view(-1, 1, 1, 1))
        first.weight[0].zero_()
    model, iteration, mask_dict = Resrep_1(opt, 0, model, obj, 0, NUM_IMAGES)
    assert iteration == 1
    assert sum(int((m[:, 0, 0, 0] == 0).sum()) for m in mask_dict.values()) == obj.pruner.masked_rows() > 0
    F.cross_entropy(model(_X[:BATCH]), _Y[:BATCH]).backward()
    raw = {w: w.grad.clone() for w in mask_dict}
    Resrep_2(opt, mask_dict)
    for weight, mask in mask_dict.items():
        norms = weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        lasso = torch.where(norms > 0, weight.detach() / norms.clamp_min(1e-30), torch.zeros_like(weight))
        expected = mask * raw[weight] + 0.01 * lasso
        torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(weight.grad).all()


def test_example_input_defaults_then_follows_the_dummy_input() -> None:
    obj = ResRep(_base_model())
    assert obj.input_shape == (1, 3, 32, 32)
    flops_32 = obj.original_flops
    model = obj.wrapped_model
    flops_64 = calculate_model_flops(model, torch.randn(1, 3, 64, 64), obj)
    assert obj.input_shape == (1, 3, 64, 64)
    assert obj.original_flops == flops_64 == mslim.prepare(_base_model(), "resrep",
                                                           example_inputs=torch.randn(1, 3, 64, 64)).pruner.original_macs
    assert 3.9 < flops_64 / flops_32 <= 4.0  # convs scale with the area, the classifier does not
    with pytest.warns(MslimWarning, match="differs from the .* MACs mslim counts"):
        obj.original_flops = flops_64 * 2
    # without the ResRep object: a plain count (here of the wrapped model, compactors included)
    assert calculate_model_flops(_base_model(), torch.randn(1, 3, 32, 32)) == flops_32


def test_img_size_from_opt_sets_the_example_input() -> None:
    obj = ResRep(_base_model())
    model = obj.wrapped_model
    Resrep_1(_opt(img_size=[48, 48]), 0, model, obj, 0, NUM_IMAGES)
    assert obj.input_shape == (1, 3, 48, 48)


def test_options_come_from_opt_validated() -> None:
    obj = ResRep(_base_model(), example_inputs=torch.randn(1, 3, 32, 32))
    model = obj.wrapped_model
    # untyped argparse options arrive as strings: validated and converted
    Resrep_1(_opt(flops_target="0.6", lasso_strength="1e-4", begin_granularity="8"), 0, model, obj, 0, NUM_IMAGES)
    config = obj.session.config
    assert (config.flops_target, config.lasso_strength, config.begin_granularity) == (0.6, 1e-4, 8)
    assert obj.pruner.target_macs == pytest.approx(0.6 * obj.original_flops)
    with pytest.raises(ConfigError, match="flops_target"):
        Resrep_1(_opt(flops_target=1.5), 1, model, obj, 0, NUM_IMAGES)
    without = argparse.Namespace(img_size=[32, 32])  # nothing set: the paper's defaults, batch 64
    fresh = ResRep(_base_model(), example_inputs=torch.randn(1, 3, 32, 32))
    Resrep_1(without, 0, fresh.wrapped_model, fresh, 0, 50000)
    assert fresh.session.config.flops_target == 0.471 and fresh.session.config.lasso_strength == 1e-4
    assert fresh.pruner.schedule.start == 5 * 782  # 5 epochs of ceil(50000 / 64)


def test_misuse_is_reported() -> None:
    obj = ResRep(_base_model(), example_inputs=torch.randn(1, 3, 32, 32))
    model = obj.wrapped_model
    with pytest.raises(MslimError, match="not ResRep_object.wrapped_model"):
        Resrep_1(_opt(), 0, _base_model(), obj, 0, NUM_IMAGES)
    model, _, mask_dict = Resrep_1(_opt(), 0, model, obj, 0, NUM_IMAGES)
    with pytest.raises(MslimError, match="got iteration=5, but the ResRep object has finished 0 iterations"):
        Resrep_1(_opt(), 5, model, obj, 0, NUM_IMAGES)
    with pytest.raises(ConfigError, match="the compactor_mask_dict that Resrep_1 returned"):
        Resrep_2(_opt(), dict(mask_dict))
    with pytest.raises(ConfigError, match="include_stem"):
        obj.pruner.configure(include_stem=True)
    for_64 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                           nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with pytest.raises(GraphError, match=r"without example_inputs tries a \(1, 3, 32, 32\) input"):
        ResRep(for_64)
    assert ResRep(for_64, example_inputs=torch.randn(1, 3, 64, 64)).input_shape == (1, 3, 64, 64)


def test_mslim_algorithms_stays_callable_after_the_seed_import() -> None:
    # importing mslim.algorithms.pytorch... makes the package the attribute mslim.algorithms
    assert "resrep" in {a.name for a in mslim.algorithms()}
    assert mslim.algorithms.pytorch.prune.Resrep_pruner.ResRep is ResRep
