"""The user-facing functions: list algorithms and plugins, prepare a session, prune a model."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from mslim_core.config import build_config, merge_recipe
from mslim_core.errors import ConfigError, UnknownAlgorithmError
from mslim_core.plugins import PluginRecord, get_plugin_manager, get_registry
from mslim_core.pruner import Pruner
from mslim_core.report import PruneReport
from mslim_core.session import PruningSession
from mslim_core.tracing import as_input_tuple, run_model


@dataclass(frozen=True)
class AlgorithmInfo:
    """One registered algorithm: its name, a one-line description, and the plugin it comes from."""

    name: str
    description: str
    plugin: str
    trains: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


class PruneResult(NamedTuple):
    """What ``prune`` returns: unpack as ``model, report = mslim.prune(...)``."""

    model: nn.Module
    report: PruneReport


def algorithms() -> list[AlgorithmInfo]:
    """Every registered algorithm, sorted by name."""
    registry = get_registry()
    return [
        AlgorithmInfo(name, cls.summary(), registry.owners[("pruners", name)], cls.trains)
        for name, cls in sorted(registry.pruners.items())
    ]


def plugins() -> list[PluginRecord]:
    """Every plugin seen: loaded, failed (with the error) or disabled, with versions and hooks."""
    return get_plugin_manager().records()


def pruner_class(algo: str) -> type[Pruner]:
    """The Pruner class registered under ``algo``; an unknown name lists the available ones."""
    pruners = get_registry().pruners
    if algo in pruners:
        return pruners[algo]
    available = sorted(pruners)
    close = difflib.get_close_matches(str(algo), available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownAlgorithmError(
        f"unknown algorithm {algo!r}.{hint} Available: {', '.join(available) or '(none: no plugin loaded)'}."
    )


def prepare(
    model: nn.Module,
    algo: str | None = None,
    example_inputs: Any = None,
    recipe: str | Path | None = None,
    **options: Any,
) -> PruningSession:
    """Validate the options (and recipe), set the algorithm up on ``model``, return a session.

    The model is changed in place (e.g. ResRep inserts compactors); pass a copy to keep it.
    """
    recipe_algo, merged = merge_recipe(recipe, options)
    algo = algo or recipe_algo
    if algo is None:
        raise ConfigError("no algorithm given: pass algo=NAME or put algo = \"NAME\" in the recipe")
    cls = pruner_class(algo)
    config = build_config(algo, cls.Config, merged)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ConfigError(
            "example_inputs is required: a tensor shaped like one batch of model input, "
            "e.g. torch.randn(1, 3, 32, 32)"
        )
    inputs = as_input_tuple(example_inputs)
    run_model(model, inputs)
    return PruningSession(cls(model, inputs, config))


def prune(
    model: nn.Module,
    algo: str | None = None,
    example_inputs: Any = None,
    recipe: str | Path | None = None,
    train_loader: Any = None,
    val_loader: Any = None,
    epochs: int | None = None,
    train_options: dict[str, Any] | None = None,
    finetune_epochs: int = 0,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in one call and return ``(smaller_model, report)``.

    Algorithms that prune while training need ``train_loader`` and ``epochs``; ``train_options``
    go to ``mslim.training.fit`` (e.g. ``{"lr": 0.05, "out_dir": "run"}``). With ``finetune_epochs``
    > 0 the pruned model (finalized, or pruned one-shot) is then fine-tuned on ``train_loader`` for
    that many epochs with the same ``train_options`` (checkpoints in ``out_dir/finetune``).
    """
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be an integer >= 0 (0: no fine-tuning), got {finetune_epochs!r}")
    if finetune_epochs > 0 and train_loader is None:
        raise ConfigError(
            f"finetune_epochs={finetune_epochs} fine-tunes the pruned model on train_loader, but no train_loader "
            "was given: pass train_loader= (and optionally val_loader=), or finetune_epochs=0"
        )
    if train_loader is not None and epochs is not None:
        from mslim.training import planned_options

        options = planned_options(algo, recipe, options, train_loader, epochs)
    session = prepare(model, algo=algo, example_inputs=example_inputs, recipe=recipe, **options)
    if session.trains:
        if train_loader is None or epochs is None:
            raise ConfigError(
                f"algorithm {session.algorithm!r} prunes while training: pass train_loader= and epochs= "
                "(and optionally val_loader=), or drive a session from your own loop with mslim.prepare()"
            )
        from mslim.training import fit

        fit(session, train_loader, val_loader=val_loader, epochs=epochs, **(train_options or {}))
    small, report = session.finalize()
    if finetune_epochs > 0:
        _finetune(small, train_loader, val_loader, finetune_epochs, train_options or {})
    return PruneResult(small, report)


def _finetune(model: nn.Module, train_loader: Any, val_loader: Any, epochs: int, train_options: dict[str, Any]) -> None:
    """Fine-tune the pruned model with ``fit``; its checkpoints go to ``out_dir/finetune`` when there is an out_dir."""
    from mslim.training import CHECKPOINT_NAME, fit

    kwargs = dict(train_options)
    if kwargs.get("out_dir") is not None:
        folder = Path(kwargs["out_dir"]) / "finetune"
        kwargs["out_dir"] = folder
        kwargs["resume"] = bool(kwargs.get("resume")) and (folder / CHECKPOINT_NAME).exists()
    kwargs.setdefault("desc", "fine-tune")
    fit(model, train_loader, val_loader=val_loader, epochs=epochs, **kwargs)
