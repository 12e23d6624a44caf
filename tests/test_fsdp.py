"""Mask training under FSDP2 (``fully_shard``): two CPU processes (gloo) train a masked model
whose parameters, the masks' among them, are sharded across the ranks; every rank must end with
the same kept() for every mask, and the gathered model must shrink exactly."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from test_ddp import end_rank, leave, run_ranks
from torch import nn

import surgery
from passes import DAM, GumbelMask, Shrink

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)


def _masked(x0):
    torch.manual_seed(0)  # the same initial model on every rank
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    return surgery.compress(net, [DAM(select="0", lam=0.5), GumbelMask(select="2", alpha=0.05, init=0.5)], (x0,))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        gm = _masked(x0)
        fsdp.fully_shard(gm)
        assert type(gm.get_submodule("dam_0").beta).__name__ == "DTensor"  # the masks are sharded too
        opt = torch.optim.Adam(gm.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)  # each rank sees other data and draws other Gumbel noise
        for _ in range(25):
            x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(gm(x), y) + surgery.penalty(gm)
            opt.zero_grad()
            loss.backward()
            opt.step()
            surgery.step(gm)
        kept = {name: m.kept().tolist() for name, m in surgery.masks(gm).items()}
        full = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.save({"kept": kept, "state": full if rank == 0 else None}, os.path.join(out_dir, f"rank{rank}.pt"))
        del gm, opt, full
        dist.barrier()  # both ranks are done with collectives before either tears gloo down
    finally:
        end_rank()
    leave()


@pytest.mark.slow
def test_fsdp2_ranks_agree_and_the_gathered_model_shrinks_exactly(tmp_path):
    world = 2
    run_ranks(_worker, world, tmp_path, "FSDP2")
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    kept = [o["kept"] for o in out]
    assert set(kept[0]) == {"dam_0", "gumbel_2"} and kept[0] == kept[1]
    assert any(not all(v) for v in kept[0].values())  # training closed units: real decisions compared
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    gathered = _masked(x0)
    gathered.load_state_dict(out[0]["state"])
    assert {name: m.kept().tolist() for name, m in surgery.masks(gathered).items()} == kept[0]
    small = surgery.compress(gathered, [Shrink()], (x0,))  # Shrink verifies itself against the masked model
    x = torch.randn(64, 8)
    assert surgery.verify.max_rel_diff(surgery.verify.run_eval(gathered, (x,)), small(x)) < 1e-5
    closed = sum(not k for v in kept[0].values() for k in v)
    params = sum(p.numel() for p in small.parameters())
    assert params < sum(p.numel() for p in gathered.parameters()) and closed > 0
