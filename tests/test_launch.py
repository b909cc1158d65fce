import pytest
import torch
import torch.distributed as dist

from megatron_tr1.launch import run_ranks


def _allreduce(rank, world_size, base):
    t = torch.tensor([base + rank], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def _fails(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_results_come_back_in_rank_order():
    assert run_ranks(_allreduce, 2, 10.0) == [21.0, 21.0]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_ranks(_fails, 2, timeout=60)
