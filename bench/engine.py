"""Engine benchmark: graph build, channel removal and cost queries, beside torch-pruning.

For each model: the time to build a ChannelGraph; the time to remove 50% of the channels of
every independent unit (ours: L1 ranking of the root's filters + ChannelGraph.remove_channels;
torch-pruning: a BasePruner with MagnitudeImportance, pruning_ratio 0.5, ``.step()``, its
ignored_layers chosen so that it prunes exactly the same groups); and the time of one cost
query (CostModel.macs_after_removing) beside one ``torch_pruning.utils.count_ops_and_params``.
Both sides run in the same process on fresh copies of the same model; medians of --repeats.

    PYTHONPATH=.:plugins python bench/engine.py [--models resnet56 resnet50 yolo_elan] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import time
import warnings

import torch
import torch_pruning as tp
from torch import nn

from mslim.models import create, example_input
from timing import median_time  # bench/timing.py (this folder is on sys.path when run as a script)
from mslim_core.cost import CostModel, count_cost
from mslim_core.graph import ChannelGraph

RATIO = 0.5


def _n_removed(channels: int) -> int:
    """Channels torch-pruning removes from a group of this size at RATIO (it keeps int(c * (1 - r)))."""
    return channels - int(channels * (1 - RATIO))


def ours_remove(model: nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    """(graph build s, removal s, MACs after) for our engine on this model (changed in place)."""
    start = time.perf_counter()
    graph = ChannelGraph(model, x)
    built = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for unit in graph.independent_units():
            k = _n_removed(unit.channels)
            if k == 0 or unit.channel_groups > 1:
                continue
            w = unit.module.weight
            scores = w.abs().flatten(1).sum(1) if not isinstance(unit.module, nn.Linear) else w.abs().sum(1)
            graph.remove_channels(unit, torch.argsort(scores)[:k])
    removed = time.perf_counter() - start
    return built, removed, count_cost(model, x).macs


def tp_ignored(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Every conv/linear that is not the root of an independent unit (depthwise partners excepted)."""
    graph = ChannelGraph(copy.deepcopy(model), x)
    roots = {u.name for u in graph.independent_units() if u.channel_groups == 1}
    ignored = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and name not in roots:
            depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels and m.groups > 1
            if not depthwise:
                ignored.append(m)
    return ignored


def tp_remove(model: nn.Module, x: torch.Tensor, ignored_names: set[str]) -> tuple[float, float, int]:
    """(pruner init s, step s, MACs after) for torch-pruning's BasePruner on this model."""
    ignored = [m for n, m in model.named_modules() if n in ignored_names]
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO, ignored_layers=ignored
    )
    built = time.perf_counter() - start
    start = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter() - start
    return built, stepped, count_cost(model, x).macs


def cost_query_times(model: nn.Module, x: torch.Tensor, n: int) -> tuple[float, float]:
    """(one CostModel.macs_after_removing, one count_ops_and_params) in seconds, on a greedy walk."""
    cm = CostModel(model, x, ChannelGraph(model, x).units)
    widths = cm.widths().tolist()
    n_units = len(widths)
    start = time.perf_counter()
    done = 0
    for i in range(n):
        u = i % n_units
        if widths[u] > 1:
            cm.macs_after_removing(u, 1, widths)
            widths[u] -= 1
            done += 1
    ours = (time.perf_counter() - start) / max(done, 1)
    tp_time = median_time(lambda: tp.utils.count_ops_and_params(model, x), 5)
    return ours, tp_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "resnet50", "yolo_elan"])
    parser.add_argument("--repeats", type=int, default=5, help="fresh models per removal timing (median)")
    parser.add_argument("--queries", type=int, default=5000, help="cost queries timed per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    print(f"torch {torch.__version__}, torch-pruning {importlib.metadata.version('torch-pruning')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores visible, {args.threads} thread(s)")
    header = (
        f"{'model':<10} {'graph':>8} {'tp init':>8} {'remove':>8} {'tp step':>8} {'ratio':>6} "
        f"{'MACs ours':>11} {'MACs tp':>11} {'query':>8} {'tp count':>9} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        torch.manual_seed(0)
        base = create(name).eval()
        x = example_input(name)
        ignored_names = {n for n, m in base.named_modules() if any(m is i for i in tp_ignored(base, x))}
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(ours_remove(copy.deepcopy(base), x))
            theirs.append(tp_remove(copy.deepcopy(base), x, ignored_names))
        g_build = statistics.median(r[0] for r in ours)
        g_remove = statistics.median(r[1] for r in ours)
        t_init = statistics.median(r[0] for r in theirs)
        t_step = statistics.median(r[1] for r in theirs)
        q_ours, q_tp = cost_query_times(copy.deepcopy(base), x, args.queries)
        print(
            f"{name:<10} {g_build * 1e3:>6.0f}ms {t_init * 1e3:>6.0f}ms {g_remove * 1e3:>6.0f}ms {t_step * 1e3:>6.0f}ms "
            f"{g_remove / t_step:>6.2f} {ours[0][2]:>11,} {theirs[0][2]:>11,} {q_ours * 1e6:>6.1f}us "
            f"{q_tp * 1e3:>7.1f}ms {q_tp / q_ours:>8,.0f}x"
        )
    print("remove/tp step: ratio of removal times (target <= 1.5); speed-up: count_ops_and_params / query "
          "(target >= 100x)")


if __name__ == "__main__":
    main()
