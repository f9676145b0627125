"""bench/accuracy.py end to end on a tiny CIFAR-10-format folder: every method runs and is reported."""

from __future__ import annotations

import json

import pytest
import torch

from mslim.data import write_cifar_folder
from tests.bench_scripts import load_bench


def test_the_comparison_runs_on_a_cifar10_folder(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (48,), generator=g)
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", images, labels, test_images=images[:16],
                                test_labels=labels[:16])
    out = tmp_path / "acc.json"
    bench = load_bench("accuracy")
    methods = ["resrep", "magnitude", "tp-groupnorm", "slimming"]
    assert bench.main(["--data", f"cifar10:{folder}", "--model", "resnet20", "--image-size", "0", "--seeds", "0",
                       "--base-epochs", "1", "--epochs", "2", "--batch-size", "16", "--threads", "1",
                       "--methods", ",".join(methods), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["data"] == f"cifar10:{folder}" and data["methods"] == methods
    (seed,) = data["seeds"]
    rows = {row["method"]: row for row in seed["rows"]}
    assert list(rows) == methods
    for name in ("magnitude", "tp-groupnorm", "slimming"):
        assert rows[name]["flops_ratio"] <= 0.471 + 0.01, name
    assert rows["resrep"]["flops_ratio"] <= 0.471 + 0.01  # the trainer plans the ramp to fit the run
    assert rows["resrep"]["finalize_delta"] == pytest.approx(0.0, abs=1e-12)
    for row in rows.values():
        assert 0.0 <= row["acc_final"] <= 1.0 and row["seconds"] > 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in methods)
