"""taylor: accumulated scores equal |w * grad| summed by hand; rounds happen on schedule and the
optimizer follows every physical removal (momentum included); every zoo model reaches its
target; state_dict resumes to the same final model; mslim.prune with a loader."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslim
from mslim import models
from mslim.data import TensorLoader
from mslim_core import TargetNotReachedWarning
from mslim_core.errors import CheckpointError, ConfigError, UnknownImportanceError
from mslim_core.importance import get_importance
from mslim_core.tracing import run_model
from mslim_taylor import RoundSchedule, round_targets


class Tiny(nn.Module):
    """conv-bn-relu x3 and a classifier: three independent units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = run_model(model, x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def generic_loss(out) -> torch.Tensor:
    out = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.float().pow(2).mean() for o in out)


def train_step(session, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    out = session.model(x)
    loss = generic_loss(out) if y is None else F.cross_entropy(out, y)
    loss.backward()
    session.after_backward()
    opt.step()
    opt.zero_grad()
    session.step()


def test_accumulated_scores_equal_w_times_grad_summed_by_hand_over_two_batches() -> None:
    model = Tiny()
    x0 = torch.randn(4, 3, 8, 8)
    session = mslim.prepare(model, algo="taylor", example_inputs=x0, interval=10)
    opt = session.optimizer(lr=0.1)
    expected = {n: torch.zeros(getattr(model, n).out_channels) for n in ("conv1", "conv2", "conv3")}
    for _ in range(2):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        F.cross_entropy(session.model(x), y).backward()
        for name in expected:  # by hand: sum over each filter of |w * dL/dw|
            w = getattr(model, name).weight
            expected[name] += (w.detach() * w.grad).abs().sum((1, 2, 3))
        session.after_backward()
        opt.step()  # the weights change between the batches
        opt.zero_grad()
        session.step()
    acc = session.pruner.accumulator
    assert acc.steps == 2 and sorted(acc.layers) == ["conv1", "conv2", "conv3"]
    for name, want in expected.items():
        torch.testing.assert_close(acc.scores(name), want, rtol=1e-5, atol=1e-8)
        unit = session.pruner.graph.unit(name)  # what the 'taylor' criterion ranks by
        got = get_importance("taylor").scores(session.pruner.graph, unit, model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert session.pruner.rounds_done == 0


def test_scores_come_from_the_last_accumulate_iters_batches_before_each_round() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(
        model, algo="taylor", example_inputs=x, flops_target=0.6, pruning_steps=2, interval=4, accumulate_iters=3
    )
    opt = session.optimizer(lr=0.01)
    for it in range(8):
        train_step(session, opt, torch.randn(2, 3, 8, 8))
    rounds = session.pruner.rounds
    assert [r["iteration"] for r in rounds] == [4, 8]
    assert [r["accumulated_batches"] for r in rounds] == [3, 3]  # iterations 1-3, then 5-7


def test_rounds_follow_the_schedule_and_the_optimizer_follows_each_removal() -> None:
    torch.manual_seed(0)
    model = models.create("resnet20")
    x = models.example_input("resnet20", batch=4)
    session = mslim.prepare(model, algo="taylor", example_inputs=x, flops_target=0.4, pruning_steps=3, interval=2)
    pruner = session.pruner
    opt = session.optimizer(lr=0.05, momentum=0.9)
    targets = round_targets(0.4, 3)
    for it in range(8):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        out = session.model(x)
        F.cross_entropy(out, y).backward()
        session.after_backward()
        opt.step()
        opt.zero_grad()
        due = pruner.schedule.round_due(it + 1, pruner.rounds_done)
        if due:  # momentum := weights, so afterwards both must have been cut the same way
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = p.detach().clone()
            snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
            kept_before = pruner.graph.kept_channels()
        session.step()
        if not due:
            continue
        k = pruner.rounds_done
        assert pruner.rounds[-1]["iteration"] == it + 1
        assert pruner.progress()["flops_ratio"] <= targets[k - 1] + 0.01
        params = {id(p) for p in model.parameters()}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == params
        for group in opt.param_groups:
            for p in group["params"]:
                assert torch.equal(opt.state[p]["momentum_buffer"], p.detach())
        kept_after = pruner.graph.kept_channels()
        pos = {n: torch.isin(kept_before[n], kept_after[n]).nonzero().flatten() for n in kept_after}
        w = model.layer1[0].conv1.weight.detach()
        torch.testing.assert_close(w, snapshot["layer1.0.conv1.weight"][pos["layer1.0.conv1"]][:, pos["conv1"]])
        # a training step right after the round works and changes the pruned weights
        out = session.model(torch.randn(4, 3, 32, 32))
        F.cross_entropy(out, torch.randint(0, 10, (4,))).backward()
        before = model.layer1[0].conv1.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, model.layer1[0].conv1.weight.detach())
    assert [r["iteration"] for r in pruner.rounds] == [2, 4, 6]
    ratios = [r["flops_ratio"] for r in pruner.rounds]
    assert ratios[0] > ratios[1] > ratios[2]
    small, report = session.finalize()
    assert report.extra["rounds_at_finalize"] == 0 and report.flops_ratio <= 0.41
    assert small(x).shape == (4, 10)


def test_a_user_built_adam_is_tracked_and_keeps_working() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(model, algo="taylor", example_inputs=x, flops_target=0.5, pruning_steps=2, interval=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    session.pruner.track_optimizer(opt)
    for _ in range(6):
        train_step(session, opt, torch.randn(2, 3, 8, 8))
    assert session.pruner.rounds_done == 2 and model.conv2.out_channels < 12
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape


@pytest.mark.parametrize("name", models.available())
def test_every_zoo_model_reaches_the_target(name: str) -> None:
    model = models.create(name)
    x = models.example_input(name, batch=2)
    shapes = [o.shape for o in outputs(model, x)]
    session = mslim.prepare(model, algo="taylor", example_inputs=x, flops_target=0.5, pruning_steps=2, interval=1)
    opt = session.optimizer(lr=0.01)
    for _ in range(3):
        train_step(session, opt, x)
    small, report = session.finalize()
    assert report.flops_ratio <= 0.5 + 0.01 and report.flops_ratio > 0.4
    assert [r["iteration"] for r in report.extra["rounds"]] == [1, 2]
    assert report.extra["rounds"][0]["flops_ratio"] <= 0.5**0.5 + 0.01
    assert [o.shape for o in outputs(small, x)] == shapes
    assert report.max_output_diff is not None and report.warnings == []


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(n)]


def test_state_dict_resumes_to_the_same_final_model() -> None:
    options = dict(flops_target=0.5, pruning_steps=3, interval=2)
    batches = _batches(7)
    torch.manual_seed(1)
    model = models.create("resnet20")
    fresh = copy.deepcopy(model)
    x = batches[0][0]
    session = mslim.prepare(model, algo="taylor", example_inputs=x, **options)
    opt = session.optimizer(lr=0.05)
    for it, (xb, yb) in enumerate(batches):
        train_step(session, opt, xb, yb)
        if it == 2:  # after round 1, halfway through accumulating for round 2
            buffer = io.BytesIO()
            torch.save(session.state_dict(), buffer)
            saved_model = copy.deepcopy(model.state_dict())
            saved_opt = copy.deepcopy(opt.state_dict())
    small, report = session.finalize()

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["pruner"]["removals"] and state["iteration"] == 3
    resumed = mslim.prepare(fresh, algo="taylor", example_inputs=x, **options)
    opt2 = resumed.optimizer(lr=0.05)
    resumed.load_state_dict(state)  # replays the removals; the optimizer now holds the smaller parameters
    fresh.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for xb, yb in batches[3:]:
        train_step(resumed, opt2, xb, yb)
    small2, report2 = resumed.finalize()
    assert report2.extra["removals"] == report.extra["removals"]
    assert [r["iteration"] for r in report2.extra["rounds"]] == [2, 4, 6]
    mine, theirs = small.state_dict(), small2.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(CheckpointError, match="freshly prepared session"):
        session_again = mslim.prepare(models.create("resnet20"), algo="taylor", example_inputs=x, **options)
        session_again.load_state_dict(state)
        session_again.load_state_dict(state)


def test_finalize_runs_the_remaining_rounds_and_other_criteria_work_without_training() -> None:
    x = models.example_input("resnet20")
    session = mslim.prepare(models.create("resnet20"), algo="taylor", example_inputs=x, flops_target=0.5)
    with pytest.raises(ConfigError, match="none were accumulated: call session.after_backward"):
        session.finalize()
    session = mslim.prepare(
        models.create("resnet20"), algo="taylor", example_inputs=x, flops_target=0.5, importance="l1", pruning_steps=3
    )
    small, report = session.finalize()
    assert report.extra["rounds_at_finalize"] == 3 and report.flops_ratio <= 0.51
    with pytest.raises(UnknownImportanceError, match="unknown importance 'tailor'"):
        mslim.prepare(models.create("resnet20"), algo="taylor", example_inputs=x, importance="tailor")
    with pytest.raises(ConfigError, match="option 'pruning_steps' = 0 is invalid"):
        mslim.prepare(models.create("resnet20"), algo="taylor", example_inputs=x, pruning_steps=0)


def test_unreachable_target_warns_and_says_why() -> None:
    x = models.example_input("resnet20")
    session = mslim.prepare(
        models.create("resnet20"), algo="taylor", example_inputs=x, flops_target=0.05, importance="l1",
        pruning_steps=2, max_ratio_per_layer=0.5,
    )
    with pytest.warns(TargetNotReachedWarning, match="not reachable"):
        _, report = session.finalize()
    assert report.extra["target_reached"] is False and report.flops_ratio > 0.06
    assert any("max_ratio_per_layer=0.5" in w for w in report.warnings)
    for unit, (before, after) in report.layer_widths.items():
        assert after == before - before // 2, unit


def test_round_targets_and_derived_interval() -> None:
    assert round_targets(0.25, 2) == pytest.approx([0.5, 0.25])
    assert round_targets(0.4, 3, "linear") == pytest.approx([0.8, 0.6, 0.4])
    schedule = RoundSchedule.from_options(steps=4, interval=None, total_iters=100, accumulate_iters=50)
    assert schedule.interval == 20 and schedule.window == 20
    assert schedule.round_iterations() == [20, 40, 60, 80]
    assert schedule.accumulates(0, 0) and schedule.round_due(20, 0) and not schedule.round_due(19, 0)
    short = RoundSchedule.from_options(steps=4, interval=None, total_iters=100, accumulate_iters=5)
    assert [short.accumulates(i, 0) for i in (14, 15, 19)] == [False, True, True]
    assert [short.accumulates(i, 1) for i in (20, 34, 35)] == [False, False, True]
    assert not short.accumulates(90, 4) and not short.round_due(100, 4)
    assert RoundSchedule.from_options(2, None, None, None).round_iterations() == []


def test_mslim_prune_with_a_loader_plans_the_rounds() -> None:
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=4)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 4, (16,))
    loader = TensorLoader(images, labels, batch_size=4)
    small, report = mslim.prune(
        model,
        algo="taylor",
        example_inputs=images[:2],
        train_loader=loader,
        epochs=2,
        flops_target=0.6,
        pruning_steps=2,
        train_options={"progress": False},
    )
    assert report.config["total_iters"] == 8 and report.extra["interval"] == 2
    assert [r["iteration"] for r in report.extra["rounds"]] == [2, 4]
    assert report.extra["rounds_at_finalize"] == 0 and report.flops_ratio <= 0.61
    assert small(images[:2]).shape == (2, 4)


def test_trainer_resume_after_a_physical_round(tmp_path):
    """A checkpoint written after taylor removed channels resumes on a freshly built model."""
    from mslim.training import fit

    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

    def run(out, resume=False, stop_after=None):
        torch.manual_seed(1)
        model = mslim.models.create("resnet20")
        session = mslim.prepare(model, algo="taylor", example_inputs=images[:1], flops_target=0.6,
                                pruning_steps=2, interval=4, total_iters=12)
        loader = TensorLoader(images, labels, batch_size=8, seed=0)

        def stop(record):
            if stop_after is not None and record["epoch"] == stop_after:
                raise KeyboardInterrupt

        try:
            fit(session, loader, epochs=3, lr=0.01, out_dir=out, resume=resume, progress=False, callbacks=[stop])
        except KeyboardInterrupt:
            return None
        return session

    full = run(tmp_path / "full")
    assert run(tmp_path / "b", stop_after=2) is None  # killed after the first round's removal
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.model.layer1[0].conv1.out_channels < 16  # the replayed rounds shrank the model
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
