"""ResRep inside a YOLO-style training loop on the zoo's ``yolo_elan`` (a YOLOv7-style detector).

    python train_resrep_yolo.py --iters 300 --flops_target 0.5 --out runs/yolo_resrep

What a YOLOv7 training loop adds to the plain ResRep loop, and how each piece fits:

- mixed precision with a GradScaler: ``scaler.unscale_(opt)`` before ``session.after_backward()``,
  so the lasso term is added to the true gradients (on scaled ones its strength would be divided
  by the loss scale); fp16 + GradScaler on CUDA, disabled on the CPU by default (``--amp bf16``
  uses CPU autocast in bfloat16, which needs no scaler; ``--amp fp16`` forces fp16 + GradScaler);
- a warm-up that ramps momentum with ``mslim_resrep.set_momentum``, which leaves the compactors'
  0.99 alone (overwriting every group's momentum would silently lose it);
- an EMA copy of the weights: compactor rows that ResRep holds at exactly zero are zero in the
  EMA too, and the EMA weights are the ones finalized;
- ``round_to=8``: every pruned layer keeps a multiple of 8 channels (tensor-core friendly, still
  lossless);
- the output: ``pruned.mslim`` (``mslim.save``) and ``pruned.onnx`` (``mslim.export_onnx``, when
  the ``onnx`` package is installed).

The data are random images and the loss is a stand-in for YOLOv7's (objectness BCE on every
cell, class cross-entropy and box L1 on random "object" cells): it gives the loop real
gradients to work with, nothing more. Swap in your dataset and YOLOv7's loss for real use.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mslim_resrep import set_momentum
from torch import nn

import mslim
from mslim.models import create
from mslim_core.atomic import atomic_write_text
from mslim_core.checkpoint import save_checkpoint
from mslim_core.report import PruneReport
from mslim_core.session import PruningSession

ANCHORS = 3


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every number typed. Defaults follow YOLOv7's hyper-parameters where they apply."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=positive_int, default=300, help="training iterations")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--img_size", type=positive_int, default=128, help="square input side (a multiple of 32)")
    p.add_argument("--num_images", type=positive_int, default=64, help="size of the random stand-in dataset")
    p.add_argument("--num_classes", type=positive_int, default=10)
    p.add_argument("--flops_target", type=float, default=0.5)
    p.add_argument("--lasso_strength", type=float, default=1e-4)
    p.add_argument("--round_to", type=positive_int, default=8, help="kept channels per layer: a multiple of this")
    p.add_argument("--lr", type=float, default=0.01, help="YOLOv7's lr0")
    p.add_argument("--lrf", type=float, default=0.1, help="final lr = lr * lrf (cosine after the warm-up)")
    p.add_argument("--momentum", type=float, default=0.937, help="YOLOv7's momentum (compactors keep 0.99)")
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--warmup_iters", type=int, default=None, help="default: 10%% of --iters")
    p.add_argument("--warmup_momentum", type=float, default=0.8)
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--ema_tau", type=float, default=2000.0, help="EMA decay ramp: decay * (1 - exp(-updates / tau))")
    p.add_argument("--amp", choices=("auto", "off", "fp16", "bf16"), default="auto",
                   help="auto: fp16 + GradScaler on CUDA, off on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/yolo_resrep", help="folder for last.pt, pruned.mslim, pruned.onnx")
    return p.parse_args(argv)


# -- stand-in data and loss ------------------------------------------------------------------


def random_dataset(args: argparse.Namespace) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """Random images and, per head (strides 8/16/32), random objectness, class and box targets."""
    g = torch.Generator().manual_seed(args.seed)
    n, s = args.num_images, args.img_size
    images = torch.rand(n, 3, s, s, generator=g)
    targets = []
    for stride in (8, 16, 32):
        h = w = s // stride
        obj = (torch.rand(n, ANCHORS, h, w, generator=g) < 0.1).float()
        cls = torch.randint(0, args.num_classes, (n, ANCHORS, h, w), generator=g)
        box = torch.rand(n, ANCHORS, h, w, 4, generator=g)
        targets.append((obj, cls, box))
    return images, targets


def stand_in_loss(preds: tuple[torch.Tensor, ...], targets: list[tuple[torch.Tensor, ...]], num_classes: int) -> torch.Tensor:
    """Objectness BCE on every cell + class CE and box L1 on object cells, summed over the three heads.

    A stand-in for YOLOv7's loss (no anchors matching, no IoU): enough to train the loop.
    """
    total = preds[0].new_zeros((), dtype=torch.float32)
    for pred, (obj, cls, box) in zip(preds, targets):
        b, _, h, w = pred.shape
        p = pred.float().view(b, ANCHORS, num_classes + 5, h, w).permute(0, 1, 3, 4, 2)  # (b, A, h, w, 5 + C)
        total = total + F.binary_cross_entropy_with_logits(p[..., 4], obj)
        pos = obj > 0
        if bool(pos.any()):
            total = total + F.cross_entropy(p[..., 5:][pos], cls[pos]) + F.l1_loss(p[..., :4][pos].sigmoid(), box[pos])
    return total


# -- EMA ---------------------------------------------------------------------------------------


class ModelEMA:
    """YOLO-style exponential moving average of a model's weights, its decay ramped up over the first updates.

    Compactor rows that ResRep holds at exactly zero in the live model are set to zero in the EMA
    too (masks only grow), so the EMA weights finalize losslessly.
    """

    def __init__(self, model: nn.Module, compactor_keys: list[str], decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0
        self.compactor_keys = compactor_keys

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the live weights in (one fused multiply-add over all float tensors), then copy the zero rows."""
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        live = model.state_dict()
        ema = self.module.state_dict()
        keys = [k for k, v in ema.items() if v.is_floating_point()]
        ema_t, live_t = [ema[k] for k in keys], [live[k].detach() for k in keys]
        torch._foreach_mul_(ema_t, d)
        torch._foreach_add_(ema_t, live_t, alpha=1.0 - d)
        for key in self.compactor_keys:
            held = live[key].flatten(1).abs().amax(dim=1) == 0
            ema[key].mul_((~held).to(ema[key].dtype).view(-1, 1, 1, 1))

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the update count (plain data for a checkpoint)."""
        return {"weights": {k: v.detach() for k, v in self.module.state_dict().items()}, "updates": self.updates}


# -- the loop ------------------------------------------------------------------------------------


@dataclass
class YoloRun:
    """What a run produced: the session (its ``model`` holds the EMA weights at the end), the EMA, the result."""

    session: PruningSession
    ema: ModelEMA
    optimizer: torch.optim.Optimizer
    small: nn.Module
    report: PruneReport
    example: torch.Tensor
    files: dict[str, Path]


def amp_settings(choice: str, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, its dtype, GradScaler on) for ``--amp``."""
    if choice == "auto":
        choice = "fp16" if device.type == "cuda" else "off"
    if choice == "off":
        return False, torch.float32, False
    if choice == "bf16":
        return True, torch.bfloat16, False  # bfloat16 has fp32's range: no loss scaling needed
    return True, torch.float16, True


def run(args: argparse.Namespace) -> YoloRun:
    """Train with ResRep for ``args.iters`` iterations, then finalize the EMA weights and write the files."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, targets = random_dataset(args)
    example = images[:1].clone()

    model = create("yolo_elan", num_classes=args.num_classes)
    session = mslim.prepare(model, algo="resrep", example_inputs=example, flops_target=args.flops_target,
                            lasso_strength=args.lasso_strength, round_to=args.round_to, total_iters=args.iters)
    wrapped = session.model.to(device)
    optimizer = session.optimizer(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    autocast_on, amp_dtype, scaler_on = amp_settings(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=scaler_on)
    compactor_keys = [f"{u.compactor_path}.weight" for u in session.pruner.units]
    ema = ModelEMA(wrapped, compactor_keys, args.ema_decay, args.ema_tau)
    warmup = args.warmup_iters if args.warmup_iters is not None else max(1, args.iters // 10)
    per_epoch = max(1, args.num_images // args.batch_size)

    start = time.time()
    for it in range(args.iters):
        # warm-up: lr from 0 and momentum from warmup_momentum, then cosine to lr * lrf
        if it < warmup:
            frac = it / warmup
            lr = args.lr * frac
            set_momentum(optimizer, args.warmup_momentum + frac * (args.momentum - args.warmup_momentum))
        else:
            if it == warmup:
                set_momentum(optimizer, args.momentum)
            t = (it - warmup) / max(1, args.iters - warmup)
            lr = args.lr * (args.lrf + (1.0 - args.lrf) * 0.5 * (1.0 + math.cos(math.pi * t)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        b = it % per_epoch
        idx = slice(b * args.batch_size, (b + 1) * args.batch_size)
        batch = images[idx].to(device, non_blocking=True)
        batch_targets = [tuple(t[idx].to(device, non_blocking=True) for t in head) for head in targets]

        wrapped.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast_on):
            loss = stand_in_loss(wrapped(batch), batch_targets, args.num_classes)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)          # 1. true gradients
        session.after_backward()            # 2. mask + lasso on them
        scaler.step(optimizer)              # 3. skipped by the scaler on inf/NaN
        scaler.update()
        session.step()                      # proximal zeroing and mask updates
        ema.update(wrapped)
        if it % max(1, args.iters // 10) == 0 or it == args.iters - 1:
            figures = session.progress()
            print(f"iter {it}: loss {loss.item():.4f}, lr {lr:.5f}, FLOPs ratio {figures['flops_ratio']:.4f}, "
                  f"masked {int(figures['masked'])}, zeroed {int(figures['zeroed'])}, {time.time() - start:.1f} s")

    files = {"checkpoint": out / "last.pt"}
    save_checkpoint(files["checkpoint"], wrapped, optimizer, session, {"ema": ema.state_dict()},
                    iteration=args.iters, scaler=scaler)
    # finalize the EMA weights: load them into the wrapped model (compactors, masks and schedule stay)
    wrapped.load_state_dict(ema.module.state_dict())
    wrapped.cpu()
    small, report = session.finalize()
    print(report.summary())
    files["model"] = out / "pruned.mslim"
    mslim.save(small, files["model"], report, original=lambda: create("yolo_elan", num_classes=args.num_classes),
               example_inputs=example)
    atomic_write_text(json.dumps(report.to_dict(), indent=1, default=str), out / "report.json")
    try:
        import onnx  # noqa: F401
    except ImportError:
        print("onnx is not installed: skipping pruned.onnx (pip install 'mslim[onnx]')")
    else:
        files["onnx"] = mslim.export_onnx(small, out / "pruned.onnx", example)
    print("written: " + ", ".join(str(p) for p in files.values()))
    return YoloRun(session, ema, optimizer, small, report, example, files)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
