"""The trainer: drives any algorithm's session (or a plain model) through epochs of SGD.

``fit`` runs SGD with the algorithm's parameter groups and a per-iteration cosine learning
rate decaying to 0, evaluates each epoch, shows a progress bar, appends metrics to
``metrics.jsonl`` and writes an atomic ``last.pt`` checkpoint each epoch from which
``resume=True`` continues exactly. Under ``torchrun`` it wraps the model in
DistributedDataParallel, shards ``TensorLoader`` objects by rank, and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mslim import distributed
from mslim_core.atomic import atomic_write_text
from mslim_core.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from mslim_core.config import merge_recipe
from mslim_core.errors import CheckpointError, MslimWarning, TrainingError
from mslim_core.pruner import Pruner
from mslim_core.safe_load import safe_torch_load
from mslim_core.session import PruningSession
from mslim_core.tracing import preserved_modes

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "PlainSession",
    "TrainResult",
    "checkpoint_meta",
    "cosine_factor",
    "evaluate",
    "fit",
    "load_training_checkpoint",
    "planned_options",
]

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
TRAINER_TAG = "mslim.trainer"
_BAR_EVERY = 10


class PlainSession:
    """A session-shaped wrapper around a plain model, so ``fit`` trains models with no algorithm.

    Uses the base ``Pruner`` rules for parameter groups (no weight decay on norms and biases).
    """

    algorithm: str | None = None
    trains = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.iteration = 0

    def optimizer(
        self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """SGD with decay on weights only."""
        from mslim_core.pruner import Pruner

        groups = Pruner.param_groups(self, lr=lr, momentum=momentum, weight_decay=weight_decay)  # type: ignore[arg-type]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def after_backward(self) -> None:
        """Nothing to shape."""

    def step(self) -> None:
        """Count the iteration."""
        self.iteration += 1

    def progress(self) -> dict[str, float]:
        """No algorithm figures."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The iteration count; ``algorithm`` None marks plain training."""
        return {"format": 1, "algorithm": None, "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the iteration count."""
        if state.get("algorithm") is not None:
            raise CheckpointError(
                f"the checkpoint holds a {state['algorithm']!r} pruning session, not plain training"
            )
        self.iteration = int(state.get("iteration", 0))


SessionLike = PruningSession | PlainSession


@dataclass
class TrainResult:
    """What ``fit`` did: per-epoch metrics, the final and best validation figures, where it wrote."""

    epochs: int
    iterations: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_accuracy: float | None = None
    val_loss: float | None = None
    best_val_accuracy: float | None = None
    seconds: float = 0.0
    resumed_from_epoch: int | None = None
    checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = dict(self.__dict__)
        data["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return data


def cosine_factor(iteration: int, total: int) -> float:
    """Cosine decay from 1 (iteration 0) towards 0 (iteration ``total``), no warm-up."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))


def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device | str | None = None
) -> tuple[float, float]:
    """Top-1 accuracy (a fraction in [0, 1]) and mean cross-entropy of ``model`` over ``loader``.

    Runs in eval mode without gradients and restores the model's modes. When the loader is sharded
    across processes (``world_size`` > 1), the figures are summed over every process.
    """
    dev = _resolve_device(device, model)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    with preserved_modes(model, train=False), torch.no_grad():
        for batch in loader:
            x, y = _unpack(batch)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").to(torch.float64)
            correct += (logits.argmax(1) == y).sum().to(torch.float64)
            count += int(y.numel())
    totals = [float(correct), float(loss_sum), float(count)]
    if distributed.is_distributed() and getattr(loader, "world_size", 1) > 1:
        totals = distributed.all_reduce_sum(totals)
    if totals[2] == 0:
        raise TrainingError("the evaluation loader yielded no samples")
    return totals[0] / totals[2], totals[1] / totals[2]


def fit(
    session: SessionLike | nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
    log_every: int = 50,
    progress: bool = True,
    device: torch.device | str | None = None,
    meta: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    desc: str | None = None,
    check_finite: bool = True,
) -> TrainResult:
    """Train ``session.model`` for ``epochs`` epochs, calling the session's hooks around each step.

    Per step: forward, cross-entropy, backward, a NaN/inf check of the loss and gradients,
    ``session.after_backward()``, ``optimizer.step()``, ``session.step()``. ``session`` may also be
    a plain ``nn.Module``. A pruner with ``plan(total_iters, iters_per_epoch)`` is told the run's length. With ``out_dir``, writes ``metrics.jsonl`` and ``last.pt`` (each epoch);
    ``resume=True`` continues from ``last.pt``. ``meta`` (JSON-like) is stored in the checkpoint;
    each callback gets every epoch's metrics dict after the checkpoint is written.
    """
    run = session if isinstance(session, (PruningSession, PlainSession)) else None
    if run is None:
        if not isinstance(session, nn.Module):
            raise TrainingError(
                f"fit() takes a PruningSession (from mslim.prepare) or an nn.Module, got {type(session).__name__}"
            )
        run = PlainSession(session)
    _check_settings(epochs, lr, momentum, weight_decay, log_every)
    dist_on = distributed.is_distributed()
    main = distributed.is_main()
    if dist_on:
        _shard(train_loader, equal=True)
        if val_loader is not None:
            _shard(val_loader, equal=False)
    try:
        iters_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise TrainingError("the training loader must have a length (batches per epoch)") from None
    if iters_per_epoch <= 0:
        raise TrainingError("the training loader yields no batches: check the dataset and the batch size")
    total_iters = epochs * iters_per_epoch
    dev = _resolve_device(device, run.model)
    run.model.to(dev)
    pruner = getattr(run, "pruner", None)  # None when training a plain model
    if isinstance(pruner, Pruner):  # an algorithm that plans its schedule learns the run's length
        pruner.plan(total_iters, iters_per_epoch)
    _check_planned(run, total_iters)
    optimizer = run.optimizer(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    schedule = {
        "epochs": epochs,
        "iters_per_epoch": iters_per_epoch,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "world_size": distributed.world_size(),
    }
    start_epoch, iteration, history = 0, 0, []
    resumed_from: int | None = None
    if resume:
        if ckpt_path is None:
            raise TrainingError("resume=True needs out_dir, the folder holding last.pt")
        state = load_training_checkpoint(ckpt_path)
        extra = state["extra"]
        _check_schedule(extra.get("schedule", {}), schedule, ckpt_path)
        start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
        history = list(extra.get("history", []))
        _restore(ckpt_path, state, run, optimizer, train_loader)
        resumed_from = start_epoch
        if main:
            _trim_metrics(out / METRICS_NAME, iteration)  # drop lines of the epoch the stop interrupted
    elif ckpt_path is not None and ckpt_path.exists():
        raise CheckpointError(
            f"{ckpt_path} already exists: pass resume=True (--resume) to continue that run, "
            "or choose another output folder; it is never overwritten by a new run"
        )
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)

    train_model: nn.Module = _wrap_ddp(run.model, dev) if dist_on else run.model

    algorithm = getattr(run, "algorithm", None)
    bar = _progress_bar(progress and main, total_iters, iteration, desc or (algorithm or "train"))
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            epoch_started = time.perf_counter()
            _set_epoch(train_loader, epoch)
            train_model.train()
            loss_sum = torch.zeros((), dtype=torch.float64)
            correct = torch.zeros((), dtype=torch.float64)
            seen = 0
            for batch_index, batch in enumerate(train_loader):
                if batch_index >= iters_per_epoch:
                    break
                x, y = _unpack(batch)
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                factor = cosine_factor(iteration, total_iters)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                optimizer.zero_grad(set_to_none=True)
                logits = train_model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                loss_value = float(loss.detach())
                if check_finite:
                    _check_finite(run.model, loss_value, iteration, epoch, batch_index, None)
                run.after_backward()
                if check_finite:
                    _check_finite(run.model, loss_value, iteration, epoch, batch_index, algorithm)
                optimizer.step()
                run.step()
                if dist_on and _params_changed(run.model, train_model):
                    train_model = _wrap_ddp(run.model, dev)  # the algorithm removed channels (e.g. taylor)
                iteration += 1
                n = int(y.numel())
                seen += n
                loss_sum += loss_value * n
                correct += (logits.detach().argmax(1) == y).sum().to(torch.float64).cpu()
                if bar is not None:
                    bar.update(1)
                    if iteration % _BAR_EVERY == 0 or batch_index == iters_per_epoch - 1:
                        bar.set_postfix(_postfix(epoch, loss_sum, correct, seen, run, history), refresh=False)
                if out is not None and main and log_every and iteration % log_every == 0:
                    _append_metrics(out / METRICS_NAME, {
                        "kind": "step", "epoch": epoch + 1, "iteration": iteration,
                        "lr": optimizer.param_groups[0]["lr"], "loss": loss_value, **_figures(run),
                    })
            train_loss, train_acc, seen_total = distributed.all_reduce_sum(
                [float(loss_sum), float(correct), float(seen)]
            )
            record: dict[str, Any] = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "iteration": iteration,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss / max(seen_total, 1.0),
                "train_accuracy": train_acc / max(seen_total, 1.0),
            }
            if val_loader is not None:
                val_acc, val_loss = evaluate(run.model, val_loader, dev)
                record["val_accuracy"], record["val_loss"] = val_acc, val_loss
            record.update(_figures(run))
            record["seconds"] = time.perf_counter() - epoch_started
            history.append(record)
            if bar is not None:
                bar.set_postfix(_postfix(epoch, loss_sum, correct, seen, run, history))
            rng = distributed.all_gather_objects(torch.get_rng_state())
            if ckpt_path is not None and main:
                _append_metrics(out / METRICS_NAME, record)  # type: ignore[operator]
                save_checkpoint(
                    ckpt_path, run.model, optimizer, run,
                    extra=_extra(run, train_loader, history, schedule, meta, rng),
                    epoch=epoch + 1, iteration=iteration,
                )
            distributed.barrier()
            for callback in callbacks:
                callback(record)
    finally:
        if bar is not None:
            bar.close()
    vals = [h["val_accuracy"] for h in history if h.get("val_accuracy") is not None]
    last = history[-1] if history else {}
    return TrainResult(
        epochs=epochs,
        iterations=iteration,
        history=history,
        val_accuracy=last.get("val_accuracy"),
        val_loss=last.get("val_loss"),
        best_val_accuracy=max(vals) if vals else None,
        seconds=time.perf_counter() - started,
        resumed_from_epoch=resumed_from,
        checkpoint=ckpt_path if ckpt_path is not None and ckpt_path.exists() else None,
    )


def planned_options(
    algo: str | None,
    recipe: str | Path | None,
    options: Mapping[str, Any],
    train_loader: Any,
    epochs: int,
) -> dict[str, Any]:
    """``options`` plus ``total_iters`` (epochs x batches per epoch) when the algorithm's config has that
    field and neither the options nor the recipe set it: algorithms that plan their schedule (ResRep's
    short-schedule zeroing) then fit the run. Under ``torchrun`` the loader is sharded first.
    """
    from mslim.api import pruner_class

    recipe_algo, merged = merge_recipe(recipe, options)
    name = algo or recipe_algo
    result = dict(options)
    if name is None or merged.get("total_iters") is not None:
        return result
    if "total_iters" not in pruner_class(name).Config.model_fields:
        return result
    if distributed.is_distributed():
        _shard(train_loader, equal=True)
    try:
        per_epoch = len(train_loader)
    except TypeError:
        return result
    result["total_iters"] = int(epochs) * per_epoch
    return result


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint the trainer wrote (``last.pt``) without running pickled code; return its raw state.

    Keys: ``epoch``, ``iteration``, ``model``, ``optimizer``, ``session``, ``rng`` and ``extra`` (the
    trainer's ``schedule``, ``history``, ``meta``, ``loader``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path} (expected the last.pt a previous run wrote)")
    state = safe_torch_load(path, what=f"checkpoint '{path}'")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a mslim training checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    extra = state.get("extra")
    if not isinstance(extra, dict) or extra.get("written_by") != TRAINER_TAG:
        raise CheckpointError(
            f"'{path}' is a training checkpoint, but not one written by mslim's trainer (mslim.training.fit): "
            "it lacks the schedule and model description the trainer records"
        )
    return state


def checkpoint_meta(state: Mapping[str, Any]) -> dict[str, Any]:
    """The model description a trainer checkpoint records (model name, classes, channels, input shape, ...)."""
    extra = state.get("extra") or {}
    return dict(extra.get("meta") or {})


# -- internals ---------------------------------------------------------------------------------


def _check_settings(epochs: Any, lr: Any, momentum: Any, weight_decay: Any, log_every: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise TrainingError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise TrainingError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise TrainingError(f"momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise TrainingError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise TrainingError(f"log_every must be an integer >= 0 (0: no step lines), got {log_every!r}")


def _resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _wrap_ddp(model: nn.Module, dev: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    wrapper = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    wrapper.mslim_param_ids = tuple(id(p) for p in model.parameters())  # type: ignore[assignment]
    return wrapper


def _params_changed(model: nn.Module, wrapper: nn.Module) -> bool:
    """Whether the model's parameters are no longer the ones the DDP wrapper was built over."""
    return getattr(wrapper, "mslim_param_ids", None) != tuple(id(p) for p in model.parameters())


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TrainingError(f"each batch must be (inputs, labels), got {type(batch).__name__}")


def _shard(loader: Any, equal: bool) -> None:
    """Give this rank its slice of a ``TensorLoader`` that is not sharded yet."""
    if getattr(loader, "world_size", None) == 1 and hasattr(loader, "rank"):
        loader.rank = distributed.rank()
        loader.world_size = distributed.world_size()
        loader.equal_shards = equal
        if equal and loader.num_samples == 0:
            raise TrainingError(
                f"{len(loader.labels)} training samples cannot give each of {loader.world_size} processes a sample"
            )


def _set_epoch(loader: Any, epoch: int) -> None:
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if target is not None and callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)
            return


def _check_planned(run: SessionLike, total_iters: int) -> None:
    """Warn when an algorithm that plans by ``total_iters`` was prepared for another number of iterations."""
    config = getattr(run, "config", None)
    if "total_iters" not in getattr(type(config), "model_fields", {}):
        return
    planned = getattr(config, "total_iters")
    if planned == total_iters:
        return
    said = "without total_iters" if planned is None else f"with total_iters={planned}"
    warnings.warn(
        f"algorithm {run.algorithm!r} was prepared {said}, but this run has {total_iters} iterations "
        f"(epochs x batches per epoch); prepare it with total_iters={total_iters} so its schedule fits the run "
        "(mslim.prune and mslim train do this for you)",
        MslimWarning,
        stacklevel=3,
    )


def _figures(run: SessionLike) -> dict[str, float]:
    try:
        figures = run.progress()
    except Exception:  # a progress display must never stop training
        return {}
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float))}


def _postfix(
    epoch: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, run: SessionLike, history: list
) -> dict[str, str]:
    post = {"ep": str(epoch + 1)}
    if seen:
        post["loss"] = f"{float(loss_sum) / seen:.3f}"
        post["acc"] = f"{100 * float(correct) / seen:.1f}"
    if history and history[-1].get("val_accuracy") is not None:
        post["val"] = f"{100 * history[-1]['val_accuracy']:.1f}"
    for key, value in _figures(run).items():
        post["flops" if key == "flops_ratio" else key] = str(int(value)) if value.is_integer() else f"{value:.3f}"
    return post


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5, unit="it")


def _check_finite(
    model: nn.Module, loss: float, iteration: int, epoch: int, batch: int, after: str | None
) -> None:
    """Raise TrainingError if the loss or any gradient is NaN/inf, naming the first such layer."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    bad: str | None = None
    if named:
        norms = torch._foreach_norm([g for _, g in named])
        if not bool(torch.isfinite(torch.stack([v.float() for v in norms])).all()):
            bad = next((n for n, g in named if not bool(torch.isfinite(g).all())), None)
    if bad is None and math.isfinite(loss):
        return
    where = f"iteration {iteration} (epoch {epoch + 1}, batch {batch})"
    stage = f" after the {after!r} algorithm's after_backward()" if after else ""
    if bad is not None:
        layer = bad.rsplit(".", 1)[0] if "." in bad else bad
        message = (
            f"non-finite gradient{stage} at {where}: the first layer with a NaN/inf gradient is {layer!r} "
            f"(parameter {bad!r}); the loss was {loss:.6g}."
        )
    else:
        message = f"the loss is {loss} at {where}."
    raise TrainingError(
        message + " Lower the learning rate, check the inputs for NaN/inf, or resume from the last checkpoint."
    )


def _extra(
    run: SessionLike,
    loader: Any,
    history: list[dict[str, Any]],
    schedule: dict[str, Any],
    meta: Mapping[str, Any] | None,
    rng: list[torch.Tensor],
) -> dict[str, Any]:
    """The trainer's own part of a checkpoint: schedule, metrics so far, model description, RNG per rank."""
    example = getattr(getattr(run, "pruner", None), "example_inputs", None)
    info = dict(meta or {})
    if example and "input_shape" not in info:
        info["input_shape"] = list(example[0].shape[1:])
    extra: dict[str, Any] = {
        "written_by": TRAINER_TAG,
        "schedule": schedule,
        "history": history,
        "meta": info,
        "rank_rng": rng,
    }
    if callable(getattr(loader, "state_dict", None)):
        extra["loader"] = loader.state_dict()
    return extra


def _check_schedule(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    keys = ("epochs", "iters_per_epoch", "lr", "world_size")
    diff = [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in keys if k in saved and saved[k] != current[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume {path} exactly: the run was started with other settings ({'; '.join(diff)}). "
            "Resume with the original epochs, learning rate, batch size and number of processes."
        )


def _restore(path: Path, state: dict[str, Any], run: SessionLike, optimizer: torch.optim.Optimizer,
             loader: Any) -> None:
    saved = (state.get("session") or {}).get("algorithm")
    if saved != getattr(run, "algorithm", None):
        what = f"a {saved!r} pruning session" if saved else "plain training (no algorithm)"
        mine = f"algorithm {run.algorithm!r}" if getattr(run, "algorithm", None) else "plain training"
        raise CheckpointError(f"the checkpoint holds {what}; this run uses {mine}")
    load_checkpoint(path, run.model, optimizer, run, restore_rng=True)
    extra = state["extra"]
    ranks = extra.get("rank_rng") or []
    if len(ranks) == distributed.world_size() > 1:
        torch.set_rng_state(ranks[distributed.rank()])
    if "loader" in extra and callable(getattr(loader, "load_state_dict", None)):
        loader.load_state_dict(extra["loader"])


def _append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _trim_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics lines up to the checkpoint's iteration (and no half-written line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("iteration", 0)) <= iteration:
            kept.append(line)
    atomic_write_text("".join(k + "\n" for k in kept), path)
