"""Sharding over ``torch.distributed`` ranks and gathering to rank 0.

When torch.distributed is initialised with more than one process (``torchrun``; gloo on
CPU, NCCL on GPUs), the image rows are split into one contiguous shard per rank
(``shard_rows``), every rank scores its shard against all captions, and the results are
gathered on rank 0 (``gather_rows`` in bounded column chunks, ``gather_all`` for small
equally shaped tensors). Nothing here knows what is being scored.
"""
from __future__ import annotations

from typing import Optional

import torch


def rank_and_world(distributed: Optional[bool]) -> tuple:
    """(rank, world_size) of the run; (0, 1) when not distributed."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not active:
        raise RuntimeError("distributed=True but torch.distributed is not initialised with "
                           "more than one process (launch with torchrun)")
    if distributed is False or not active:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_rows(n_rows: int, rank: int, world: int, block: int = 1) -> tuple:
    """The contiguous rows [start, stop) of ``rank``: whole blocks of ``block`` rows, the
    blocks balanced over the ranks in rank order. Whole blocks mean every rank computes
    exactly the tiles a single process computes, so the gathered result is identical."""
    n_blocks = (n_rows + block - 1) // block
    first, last = n_blocks * rank // world, n_blocks * (rank + 1) // world
    return min(n_rows, first * block), min(n_rows, last * block)


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0


def _comm_device():
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, shards: list, write, col_chunk: int = 4096):
    """Gathers every rank's rows (contiguous ``shards[rank]``) to rank 0, column chunk by
    column chunk (bounded communication buffers); rank 0 calls write(r0, r1, c0, c1, block)."""
    import torch.distributed as dist

    rank, n_ranks = dist.get_rank(), len(shards)
    comm = _comm_device()
    height = max(b - a for a, b in shards)
    n_cols = local.shape[1]
    for c0 in range(0, n_cols, col_chunk):
        c1 = min(n_cols, c0 + col_chunk)
        mine = torch.zeros((height, c1 - c0), dtype=local.dtype, device=comm)
        mine[:local.shape[0]] = local[:, c0:c1].to(comm)
        bucket = [torch.empty_like(mine) for _ in range(n_ranks)] if rank == 0 else None
        dist.gather(mine, bucket, dst=0)
        if rank == 0:
            for (a, b), got in zip(shards, bucket):
                write(a, b, c0, c1, got[:b - a].cpu())


def gather_all(local: torch.Tensor, n_ranks: int):
    """Every rank's equally shaped tensor, on rank 0 (a list in rank order); None elsewhere."""
    import torch.distributed as dist

    comm = _comm_device()
    mine = local.to(comm)
    bucket = [torch.empty_like(mine) for _ in range(n_ranks)] if dist.get_rank() == 0 else None
    dist.gather(mine, bucket, dst=0)
    return None if bucket is None else [t.cpu() for t in bucket]
