"""The whole job in one call: train a base model, prune it with any algorithm, measure, write the results.

Training algorithms (``trains=True``, e.g. ResRep, slimming) train through their session and are
then finalized; one-shot algorithms prune the trained base model. Either way the pruned model is
then fine-tuned for ``finetune_epochs`` (default: 0 after a training algorithm, ``epochs`` after
a one-shot one). Both end with the same figures for the base and the pruned model (accuracy,
MACs, parameters, CPU latency), a JSON report, a per-layer width chart and the pruned model file
under ``out_dir``. Each training phase checkpoints into its own sub-folder (``base``, ``prune``,
``finetune``), so ``resume=True`` picks a stopped run up in the phase it was in; a run stopped
while fine-tuning a finalized model finalizes again from the finished ``prune`` checkpoint (the
same model, deterministically) and continues the ``finetune`` checkpoint.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import mslim
from mslim import distributed
from mslim.api import pruner_class
from mslim.data import load_dataset, make_loaders
from mslim.layers import output_widths
from mslim.models import create as create_model
from mslim.training import CHECKPOINT_NAME, evaluate, fit, load_training_checkpoint, planned_options
from mslim_core.atomic import atomic_write_text
from mslim_core.cost import count_cost
from mslim_core.errors import CheckpointError, ConfigError, MslimError
from mslim_core.report import PruneReport

__all__ = ["ModelFigures", "RunResult", "RunSpec", "hardware", "run", "save_model"]

REPORT_NAME = "report.json"
CHART_NAME = "layer_widths.png"
MODEL_NAME = "pruned.mslim"


@dataclass
class RunSpec:
    """Everything that defines a run: algorithm, model, data, targets, schedules, measurement."""

    algo: str
    model: str = "resnet20"
    data: str = "digits"
    image_size: int | None = None
    flops_target: float | None = 0.471
    epochs: int = 10
    """Pruning epochs for training algorithms; fine-tuning epochs after one-shot pruning unless
    ``finetune_epochs`` is set."""
    finetune_epochs: int | None = None
    """Fine-tuning epochs of the pruned model after ``finalize`` (training algorithms) or after
    one-shot pruning; None: 0 for training algorithms, ``epochs`` for one-shot ones."""
    base_epochs: int = 10
    lr: float = 0.01
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    base_weights: str | None = None
    """A trainer checkpoint (or a weights-only state dict) of the base model: skips base training."""
    threads: int = 2
    latency_batches: tuple[int, ...] = (1, 64)
    measure_latency: bool = True
    channels_last: bool = False
    """Time latency in channels-last memory format (often faster on CPUs; see docs/deployment.md)."""
    latency_runtime: str = "torch"
    """Where latency is timed: "torch" (eager) or "onnxruntime" (exported; needs the deploy extra)."""
    progress: bool = True
    device: str | None = None
    """Training device ("cpu", "cuda", "cuda:1"); None: CUDA (this process's LOCAL_RANK) when available."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["latency_batches"] = list(self.latency_batches)
        return data

    def validate(self) -> None:
        """Raise ConfigError for a setting ``run`` cannot use (checked before any work is done)."""
        from mslim.latency import RUNTIMES

        if self.latency_runtime not in RUNTIMES:
            raise ConfigError(f"latency_runtime must be one of {', '.join(RUNTIMES)}; got {self.latency_runtime!r}")
        if self.latency_runtime == "onnxruntime" and self.channels_last:
            raise ConfigError("channels_last applies to the torch latency runtime only: ONNX Runtime picks its "
                              "own layout")
        if self.latency_runtime == "onnxruntime" and self.measure_latency:
            from mslim.onnx_runtime import require_onnxruntime

            try:  # checked now, so that a missing package does not fail the run after training
                require_onnxruntime()
            except MslimError as exc:
                raise ConfigError(str(exc)) from None
        value = self.finetune_epochs
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(
                f"finetune_epochs must be an integer >= 0 (0: no fine-tuning) or None (the algorithm "
                f"kind's default), got {value!r}"
            )

    def finetune_epochs_for(self, trains: bool) -> int:
        """The fine-tuning epochs of this run: ``finetune_epochs``, or the default of the algorithm kind."""
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return 0 if trains else self.epochs


@dataclass
class ModelFigures:
    """Accuracy (fraction), mean loss, MACs, parameters and CPU latency (ms by batch size) of one model."""

    accuracy: float
    loss: float
    macs: int
    params: int
    latency_ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (latency keys as strings)."""
        data = asdict(self)
        data["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        return data


@dataclass
class RunResult:
    """What ``run`` measured and wrote."""

    spec: RunSpec
    out_dir: Path
    base: ModelFigures
    pruned: ModelFigures
    report: PruneReport
    trains: bool
    accuracy_before_finalize: float | None = None
    """Training algorithms: accuracy of the trained session model just before ``finalize``."""
    accuracy_before_finetune: float | None = None
    """Accuracy of the pruned model right after pruning (one-shot) or ``finalize`` (training
    algorithms), before fine-tuning; None when nothing is fine-tuned after a training algorithm."""
    layer_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    model: nn.Module | None = None

    @property
    def accuracy_after_finalize(self) -> float | None:
        """Training algorithms: accuracy of the finalized model before any fine-tuning."""
        if self.accuracy_before_finalize is None:
            return None
        return self.accuracy_before_finetune if self.accuracy_before_finetune is not None else self.pruned.accuracy

    @property
    def finalize_change_points(self) -> float | None:
        """Training algorithms: accuracy change (points) caused by ``finalize`` alone, not by fine-tuning."""
        after = self.accuracy_after_finalize
        return None if after is None else 100 * (after - self.accuracy_before_finalize)  # type: ignore[operator]

    @property
    def flops_ratio(self) -> float:
        """MACs after / before."""
        return self.pruned.macs / self.base.macs if self.base.macs else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {
            "mslim_version": mslim.__version__,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "spec": self.spec.to_dict(),
            "hardware": hardware(self.spec.threads),
            "base": self.base.to_dict(),
            "pruned": self.pruned.to_dict(),
            "flops_ratio": self.flops_ratio,
            "params_ratio": self.pruned.params / self.base.params if self.base.params else 1.0,
            "accuracy_change_points": 100 * (self.pruned.accuracy - self.base.accuracy),
            "trains": self.trains,
            "accuracy_before_finalize": self.accuracy_before_finalize,
            "finalize_accuracy_change_points": self.finalize_change_points,
            "accuracy_before_finetune": self.accuracy_before_finetune,
            "prune_report": self.report.to_dict(),
            "layer_widths": {k: list(v) for k, v in self.layer_widths.items()},
            "seconds": self.seconds,
            "files": self.files,
            "history": self.history,
        }


def hardware(threads: int | None = None) -> dict[str, Any]:
    """The machine the figures come from: CPU model, core count, vector ISA torch uses, torch version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "threads": threads,
    }


def save_model(model: nn.Module, path: str | Path, report: PruneReport | None, meta: dict[str, Any],
               example: torch.Tensor) -> Path:
    """Write the pruned model with ``mslim.save`` (safe format, with a probe and the changes to the zoo model).

    ``meta`` (zoo name, classes, input channels and shape) goes into the report's ``extra["zoo_model"]``
    so ``mslim info`` and ``mslim.load`` users can rebuild the original model from the file alone.
    """
    if report is not None:
        report.extra["zoo_model"] = {k: meta[k] for k in ("model", "num_classes", "in_channels", "input_shape")}

    def original() -> nn.Module:
        return create_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"])

    return mslim.save(model, path, report=report, original=original, example_inputs=example[:2])


def _load_base_weights(model: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"base weights {file} do not exist (expected a trainer last.pt or a state dict)")
    try:
        state = load_training_checkpoint(file)["model"]
    except CheckpointError:
        from mslim_core.safe_load import safe_torch_load

        state = safe_torch_load(file, what=f"base weights {file}")
    if not isinstance(state, dict):
        raise CheckpointError(f"base weights {file} hold a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"base weights {file} do not fit the model: {exc}") from None


def _phase_resume(resume: bool, folder: Path) -> bool:
    return resume and (folder / CHECKPOINT_NAME).exists()


def _latency(model: nn.Module, example: torch.Tensor, spec: RunSpec) -> dict[int, float]:
    from mslim.latency import deploy_form, measure_latency

    deployed = deploy_form(model, example)
    timings = measure_latency(deployed, tuple(example.shape[1:]), spec.latency_batches, threads=spec.threads,
                              channels_last=spec.channels_last, runtime=spec.latency_runtime)
    return {b: t.median_ms for b, t in timings.items()}


def _device(spec: RunSpec) -> torch.device:
    if spec.device:
        try:
            dev = torch.device(spec.device)
        except RuntimeError:
            raise ConfigError(f"device {spec.device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {spec.device!r} asked for, but this torch has no usable CUDA GPU")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run(spec: RunSpec, out_dir: str | Path, resume: bool = False,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Train the base model, prune it with ``spec.algo``, measure both, write everything under ``out_dir``."""
    main = distributed.is_main()
    say = (log or (lambda text: print(text, file=sys.stderr, flush=True))) if main else (lambda text: None)
    out = Path(out_dir)
    spec.validate()
    cls = pruner_class(spec.algo)
    finetune_epochs = spec.finetune_epochs_for(cls.trains)
    dev = _device(spec)
    if out.exists() and (out / REPORT_NAME).exists() and not resume:
        raise ConfigError(f"{out} already holds a finished run ({REPORT_NAME}); choose another --out folder")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(spec.seed)

    splits = load_dataset(spec.data, seed=spec.seed, size=spec.image_size)
    train, val = make_loaders(splits, spec.batch_size, seed=spec.seed, rank=distributed.rank(),
                              world_size=distributed.world_size())
    example = next(iter(val))[0][:8].clone().to(dev)
    model = create_model(spec.model, num_classes=splits.num_classes, in_channels=splits.in_channels).to(dev)
    meta = {
        "model": spec.model,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "input_shape": list(splits.input_shape),
        "data": spec.data,
        "seed": spec.seed,
    }
    common = {"momentum": spec.momentum, "weight_decay": spec.weight_decay, "progress": spec.progress, "device": dev}
    history: dict[str, list[dict[str, Any]]] = {}
    say(f"data: {splits!r}; model {spec.model}; algorithm {spec.algo}; device {dev}; output {out}")

    t0 = time.perf_counter()
    if spec.base_weights:
        _load_base_weights(model, spec.base_weights)
        say(f"base model: weights from {spec.base_weights}")
    elif spec.base_epochs > 0:
        say(f"training the base model for {spec.base_epochs} epochs")
        folder = out / "base"
        result = fit(model, train, val, epochs=spec.base_epochs, lr=spec.base_lr, out_dir=folder,
                     resume=_phase_resume(resume, folder), meta={**meta, "phase": "base"}, desc="base", **common)
        history["base"] = result.history
    base_acc, base_loss = evaluate(model, val)
    seconds["base"] = time.perf_counter() - t0
    say(f"base model: accuracy {100 * base_acc:.2f}%")

    options = dict(spec.options)
    if spec.flops_target is not None:
        options["flops_target"] = spec.flops_target
    t0 = time.perf_counter()
    before_finalize = before_finetune = None
    if cls.trains:
        options = planned_options(spec.algo, spec.recipe, options, train, spec.epochs)
        session = mslim.prepare(copy.deepcopy(model), algo=spec.algo, example_inputs=example, recipe=spec.recipe,
                                **options)
        say(f"pruning with {spec.algo} while training for {spec.epochs} epochs")
        folder = out / "prune"
        result = fit(session, train, val, epochs=spec.epochs, lr=spec.lr, out_dir=folder,
                     resume=_phase_resume(resume, folder), meta={**meta, "phase": "prune", "algorithm": spec.algo},
                     desc=spec.algo, **common)
        history["prune"] = result.history
        before_finalize, _ = evaluate(session.model, val)
        small, report = session.finalize()
    else:
        say(f"pruning with {spec.algo} (one shot)")
        small, report = mslim.prune(copy.deepcopy(model), algo=spec.algo, example_inputs=example, recipe=spec.recipe,
                                    **options)
    if finetune_epochs > 0 or not cls.trains:
        before_finetune, _ = evaluate(small, val)
    if finetune_epochs > 0:
        say(f"fine-tuning the pruned model for {finetune_epochs} epochs")
        folder = out / "finetune"
        result = fit(small, train, val, epochs=finetune_epochs, lr=spec.lr, out_dir=folder,
                     resume=_phase_resume(resume, folder),
                     meta={**meta, "phase": "finetune", "algorithm": spec.algo}, desc="fine-tune", **common)
        history["finetune"] = result.history
    pruned_acc, pruned_loss = evaluate(small, val)
    seconds["prune"] = time.perf_counter() - t0

    model, small, example = model.cpu(), small.cpu(), example.cpu()  # measured and saved on the CPU
    base_cost, small_cost = count_cost(model, example), count_cost(small, example)
    base_widths, small_widths = output_widths(model, example), output_widths(small, example)
    widths = {name: (w, small_widths.get(name, 0)) for name, w in base_widths.items()}
    base_fig = ModelFigures(base_acc, base_loss, base_cost.macs, base_cost.params)
    small_fig = ModelFigures(pruned_acc, pruned_loss, small_cost.macs, small_cost.params)
    if spec.measure_latency and main:
        t0 = time.perf_counter()
        fmt = "ONNX Runtime" if spec.latency_runtime == "onnxruntime" else (
            "channels-last" if spec.channels_last else "contiguous")
        say(f"timing CPU latency (batch {', '.join(map(str, spec.latency_batches))}; {spec.threads} threads; {fmt})")
        base_fig.latency_ms = _latency(model, example, spec)
        small_fig.latency_ms = _latency(small, example, spec)
        seconds["latency"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    outcome = RunResult(
        spec=spec, out_dir=out, base=base_fig, pruned=small_fig, report=report, trains=cls.trains,
        accuracy_before_finalize=before_finalize, accuracy_before_finetune=before_finetune, layer_widths=widths,
        seconds=seconds, history=history, model=small,
    )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        model_path = save_model(small, out / MODEL_NAME, report, meta, example)
        outcome.files["model"] = str(model_path)
        try:
            from mslim.chart import plot_layer_widths

            chart = plot_layer_widths(base_widths, small_widths, out / CHART_NAME,
                                      title=f"{spec.model}: output channels per layer, before and after {spec.algo}")
            outcome.files["chart"] = str(chart)
        except MslimError as exc:
            say(f"no chart: {exc}")
        outcome.files["report"] = str(out / REPORT_NAME)
        atomic_write_text(json.dumps(outcome.to_dict(), indent=2) + "\n", out / REPORT_NAME)
    distributed.barrier()
    return outcome
