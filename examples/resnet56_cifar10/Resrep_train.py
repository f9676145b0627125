"""Step 2: ResRep training of the base model (compactors, masked lasso gradients, mask schedule).

    python Resrep_train.py --data ~/data/cifar-10-batches-py --pretrained best_pretrained.pt \
        --flops_target 0.471 --lasso_strength 1e-4

Writes ``best.pt`` and ``last.pt`` into ``--out`` (default: the current folder): training checkpoints
(``mslim_core.checkpoint``, written atomically, read back with ``weights_only=True``) holding the wrapped
model, the optimizer, the ResRep session (masks, schedule position, options) and the RNG states.
``last.pt`` is written every epoch (``--resume`` continues from it); ``best.pt`` is the epoch with
the best test accuracy among those whose masks reach ``--flops_target`` with every masked row
already zero (finalize is then lossless), or the latest epoch while none does.
Defaults are the paper's: SGD, lr 0.01 cosine to 0, batch 64, 480 epochs, momentum 0.9 (0.99 on
compactors), weight decay 1e-4. The loop is the seed document's, through its API.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cifar_common import (
    accuracy,
    cifar_loaders,
    cosine_lr,
    fraction,
    pick_device,
    positive_int,
    set_lr,
)

import mslim
from mslim.algorithms.pytorch.prune.Resrep_pruner import (
    ResRep,
    Resrep_1,
    Resrep_2,
    calculate_model_flops,
)
from mslim.models import available, create
from mslim_core.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("Resrep_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option is typed (numbers never arrive as strings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the cifar-10-batches-py folder (or its parent)")
    p.add_argument("--pretrained", default="best_pretrained.pt",
                   help="base model written by train_base.py ('' to start from random weights)")
    p.add_argument("--model", default="resnet56", choices=available(), help="zoo model (default resnet56)")
    p.add_argument("--flops_target", type=fraction, default=0.471, help="fraction of FLOPs to keep")
    p.add_argument("--lasso_strength", type=float, default=1e-4)
    p.add_argument("--epochs", type=positive_int, default=480)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate, cosine to 0 per iteration")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (compactors keep 0.99)")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--begin_granularity", type=positive_int, default=4)
    p.add_argument("--num_at_least", type=positive_int, default=1)
    p.add_argument("--mask_interval", type=positive_int, default=200)
    p.add_argument("--before_mask_epochs", type=float, default=5.0)
    p.add_argument("--zeroing", choices=("proximal", "none"), default="proximal",
                   help="proximal: masked rows reach exactly zero (mslim); none: the paper's plain behaviour")
    p.add_argument("--img_size", type=positive_int, nargs="+", default=[32, 32])
    p.add_argument("--max_iters", type=positive_int, default=None, help="stop after this many iterations (smoke tests)")
    p.add_argument("--epochs_this_run", type=positive_int, default=None,
                   help="train at most this many epochs in this invocation (time-limited jobs), then --resume")
    p.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue from OUT/last.pt (or the checkpoint given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=".", help="folder for best.pt and last.pt")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    """The zoo model with the base weights from ``--pretrained`` (safe format, no pickled code)."""
    model = create(args.model, num_classes=10)
    if args.pretrained and not args.resume:
        model = mslim.load(args.pretrained, model=model)
    elif not args.resume:
        log.info("no --pretrained: ResRep starts from random weights (a trained base usually ends better)")
    return model


def main(argv: list[str] | None = None) -> int:
    """ResRep training through the seed API: Resrep_1 at the start of each iteration, Resrep_2 after backward."""
    opt = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(opt.seed)
    device = pick_device(opt.device)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader = cifar_loaders(opt.data, opt.batch_size, opt.seed, device)
    num_images = train_loader.num_samples
    total = opt.epochs * len(train_loader)
    options = {}
    if opt.max_iters is not None and opt.max_iters < total:
        total = options["total_iters"] = opt.max_iters  # plan the short run that will actually happen

    model = base_model(opt)
    dummy_input = torch.randn([1, 3, opt.img_size[0], opt.img_size[0]], generator=torch.Generator().manual_seed(0))
    ResRep_object = ResRep(copy.deepcopy(model), example_inputs=dummy_input, **options)
    model = ResRep_object.wrapped_model.to(device)
    ResRep_object.original_flops = calculate_model_flops(model, dummy_input.to(device), ResRep_object)
    optimizer = ResRep_object.sgd_optimizer(opt.momentum, lr=opt.lr, weight_decay=opt.weight_decay)

    iteration, epoch, best = 0, 0, -1.0
    if opt.resume:
        path = out / "last.pt" if opt.resume == "last" else Path(opt.resume)
        ckpt = load_checkpoint(path, model=model, optimizer=optimizer, session=ResRep_object.session,
                               map_location=device)
        iteration, epoch = int(ckpt.extra["seed_iteration"]), ckpt.epoch
        best = float(ckpt.extra.get("best_accuracy", -1.0))
        log.info(f"resumed from {path}: epoch {epoch}, iteration {iteration}")

    stop_epoch = epoch + opt.epochs_this_run if opt.epochs_this_run is not None else None
    while iteration < total and epoch != stop_epoch:
        model.train()
        train_loader.set_epoch(epoch)
        start = time.time()
        for images, target in train_loader:
            model, iteration, compactor_mask_dict = Resrep_1(opt, iteration, model, ResRep_object, epoch, num_images,
                                                             logger=log)
            set_lr(optimizer, cosine_lr(opt.lr, iteration - 1, total))
            loss = F.cross_entropy(model(images), target)
            loss.backward()
            Resrep_2(opt, compactor_mask_dict)
            optimizer.step()
            optimizer.zero_grad()
            if iteration >= total:
                break
        epoch += 1
        acc = accuracy(model, val_loader)
        progress = ResRep_object.session.progress()
        done = progress["flops_ratio"] <= opt.flops_target and progress["zeroed"] == progress["masked"]
        log.info(f"epoch {epoch - 1}: loss {loss.item():.4f}, test accuracy {acc:.2f}%, FLOPs ratio "
                 f"{progress['flops_ratio']:.4f}, masked {int(progress['masked'])}, zeroed "
                 f"{int(progress['zeroed'])}, {time.time() - start:.1f} s")
        is_best = done and acc > best
        best = acc if is_best else best
        extra = {"seed_iteration": iteration, "best_accuracy": best, "accuracy": acc, "model": opt.model,
                 "num_classes": 10, "input_shape": [1, 3, opt.img_size[0], opt.img_size[0]], "target_reached": done}
        save_checkpoint(out / "last.pt", model, optimizer, ResRep_object.session, extra, epoch=epoch,
                        iteration=iteration)
        if is_best or best < 0:  # best.pt follows the latest epoch until the target is reached losslessly
            save_checkpoint(out / "best.pt", model, optimizer, ResRep_object.session, extra, epoch=epoch,
                            iteration=iteration)
    left = f"; {total - iteration} left: continue with --resume" if iteration < total else ""
    log.info(f"done: {iteration} of {total} iterations{left}; best.pt and last.pt in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
