"""Step 1: train the base ResNet-56 on CIFAR-10 and write ``best_pretrained.pt`` (mslim's safe model format).

    python train_base.py --data ~/data/cifar-10-batches-py

The file is written with ``mslim.save`` (a JSON manifest and tensor-only weights, no pickled
module), so ``Resrep_train.py`` reads it back with ``mslim.load`` without running code from it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cifar_common import (
    INPUT_SHAPE,
    accuracy,
    cifar_loaders,
    cosine_lr,
    pick_device,
    positive_int,
    set_lr,
)

import mslim
from mslim.models import available, create

log = logging.getLogger("train_base")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (every number typed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the cifar-10-batches-py folder (or its parent)")
    p.add_argument("--model", default="resnet56", choices=available(), help="zoo model (default resnet56)")
    p.add_argument("--epochs", type=positive_int, default=200)
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate, cosine to 0")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--max_iters", type=positive_int, default=None, help="stop after this many iterations (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="best_pretrained.pt", help="where the best model goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train with SGD + cosine LR, evaluate every epoch, keep the best model on disk."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_loader, val_loader = cifar_loaders(args.data, args.batch_size, args.seed, device)
    model = create(args.model, num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=True)
    total = args.epochs * len(train_loader)
    if args.max_iters is not None:
        total = min(total, args.max_iters)
    example = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    best, iteration, epoch = -1.0, 0, 0
    while iteration < total:
        model.train()
        start = time.time()
        for images, labels in train_loader:
            set_lr(optimizer, cosine_lr(args.lr, iteration, total))
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            if iteration >= total:
                break
        acc = accuracy(model, val_loader)
        log.info(f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {acc:.2f}%, {time.time() - start:.1f} s")
        if acc > best:
            best = acc
            mslim.save(model.cpu(), Path(args.out), example_inputs=example)
            model.to(device)
        epoch += 1
    log.info(f"best test accuracy {best:.2f}%, written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
