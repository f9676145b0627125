"""ResRep under DistributedDataParallel: 2 CPU processes (gloo), each on its own data shard, agree on
masks and weights. The processes are started the way ``torchrun`` starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment); this file is also the worker (``python test_resrep_ddp.py OUT``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
ITERS = 16
BATCH = 8


def _worker(out: Path) -> None:
    """One rank: ResRep steps on a DDP-wrapped resnet20 with this rank's data; writes what it ended with."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import mslim
    from mslim.models import create

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model everywhere (DDP would broadcast rank 0's anyway)
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = mslim.prepare(create("resnet20"), "resrep", example_inputs=example, flops_target=0.5,
                            lasso_strength=1e-3, before_mask_iters=2, total_iters=ITERS)
    model = DistributedDataParallel(session.model)
    opt = session.optimizer(lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    images = torch.randn(ITERS * BATCH, 3, 32, 32, generator=data)
    labels = torch.randint(0, 10, (ITERS * BATCH,), generator=data)
    updates = []
    for it in range(ITERS):
        opt.zero_grad()
        batch = slice(it * BATCH, (it + 1) * BATCH)
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        session.after_backward()
        opt.step()
        before = session.pruner.masked_rows()
        session.step()
        updates.append(session.pruner.masked_rows() - before)
    masked_at = session.pruner._masked_at.clone()
    params = {k: v.detach().clone() for k, v in session.model.named_parameters()}
    # one more update on norms that differ between ranks: the choice is rank 0's, broadcast
    with torch.no_grad():
        for compactor in session.pruner.compactors.values():
            compactor.weight.mul_(torch.rand(compactor.weight.shape[0], 1, 1, 1,
                                             generator=torch.Generator().manual_seed(rank)) + 0.5)
    session.pruner.configure(flops_target=0.3)
    session.pruner.update_masks(ITERS)
    torch.save({"masked_at": masked_at, "params": params, "updates": updates,
                "after_update": session.pruner._masked_at.clone(),
                "zeroed": session.pruner.zeroed_rows()}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ranks_agree_on_masks_and_weights(tmp_path: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{text}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # the mask schedule ran several times while training, the same way on both ranks
    assert sum(1 for u in r0["updates"] if u > 0) >= 3 and r0["updates"] == r1["updates"]
    assert int((r0["masked_at"] >= 0).sum()) > 0 and r0["zeroed"] == r1["zeroed"] > 0
    assert torch.equal(r0["masked_at"], r1["masked_at"])
    assert r0["params"].keys() == r1["params"].keys()
    for key in r0["params"]:
        torch.testing.assert_close(r0["params"][key], r1["params"][key], rtol=0, atol=1e-6, msg=key)
    # an update on rank-dependent norms still gives one mask (rank 0's), and it grew
    assert torch.equal(r0["after_update"], r1["after_update"])
    assert int((r0["after_update"] >= 0).sum()) > int((r0["masked_at"] >= 0).sum())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
