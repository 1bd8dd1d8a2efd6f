"""``all_pairs``: the full (n_img, n_cap) similarity matrix, streamed in tiles into a tensor
in memory, a caller's ``out`` array, or a ``.npy`` file written through a memory map under
a temporary name (``rcar_fast.atomic``: renamed only when complete, so a failure never
leaves a half-written file behind). Distributed: rank 0 gathers every rank's rows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from rcar_fast.atomic import atomic_path, check_output_path
from rcar_fast.evaluation import distributed as _dist
from rcar_fast.evaluation.adapters import as_similarity_fn
from rcar_fast.evaluation.inputs import (ArrayLike, check_blocks, check_inputs, check_out,
                                         resolve_device, result_dtype)
from rcar_fast.evaluation.streaming import RunTimer, score_blocks

# Device memory the result rows may take when kept on the GPU during the run.
DEVICE_RESULT_FRACTION = 0.25


def all_pairs(img: ArrayLike, cap: ArrayLike, lens, similarity="scan", *, backend: str = "auto",
              img_block: Optional[int] = None, cap_block: Optional[int] = None,
              device=None, compute_dtype: Optional[torch.dtype] = None,
              out: Optional[ArrayLike] = None, out_path=None, sort_captions: bool = True,
              progress: bool = True, distributed: Optional[bool] = None,
              stats: Optional[dict] = None, desc: str = "similarity"):
    """The full (n_img, n_cap) similarity matrix, streamed in blocks.

    Args:
        img, cap, lens: (n_img, R, d), (n_cap, Lmax, d), (n_cap,); tensors (any device) or
            NumPy arrays / memmaps (blocks are read as needed).
        similarity: "scan" (SCAN t2i, published settings), an RCAR head (``RCARSimilarity``
            or reference ``RCARHead``), or ``fn(img, cap, lens) -> (bi, bc)``.
        backend: backend for "scan" / RCAR heads ("auto", "reference", "triton", ...).
        img_block, cap_block: tile size (images x captions per call); defaults 256 x 2048
            on GPU, 64 x 512 on CPU. They bound the memory of one call.
        device: where blocks are computed (default: cuda if available, else cpu).
        compute_dtype: cast blocks to this dtype on the device (default: keep).
        out: an (n_img, n_cap) tensor or array to fill (rank 0).
        out_path: write a .npy file instead (atomically); returns it memory-mapped read-only.
        sort_captions: form caption blocks in length order (less padding work).
        progress: tqdm progress bar with pairs/s (rank 0 only).
        distributed: None = shard over ranks when torch.distributed is initialised; False =
            never; True = require it.
        stats: if a dict is given, it receives seconds, pairs, pairs_per_s, rank, world.
    Returns:
        rank 0: the matrix (float32, or float64 for float64 inputs, unless ``out`` says
        otherwise); other ranks: None.
    """
    lens = check_inputs(img, cap, lens)
    fn = as_similarity_fn(similarity, backend)
    device = resolve_device(device)
    img_block, cap_block = check_blocks(img_block, cap_block, device)
    rank, world = _dist.rank_and_world(distributed)
    shape = (img.shape[0], cap.shape[0])
    dtype = result_dtype(img)
    if out is not None and out_path is not None:
        raise ValueError("give either out or out_path, not both")
    if out is not None:
        check_out(out, shape)
    shards = [_dist.shard_rows(shape[0], r, world, img_block) for r in range(world)]

    if rank == 0 and out_path is not None:
        out_path = check_output_path(out_path, "out_path")
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        # Written under a temporary name; renamed only when complete, removed on any error
        # or signal (rcar_fast.atomic).
        with atomic_path(out_path) as tmp:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
            _compute_into(target, img, cap, lens, fn, shards, rank, img_block, cap_block,
                          device, compute_dtype, sort_captions, progress, desc, stats)
            target.flush()
            del target
        return np.load(out_path, mmap_mode="r")
    final = None
    if rank == 0:
        final = out if out is not None else torch.empty(shape, dtype=dtype)
    _compute_into(final, img, cap, lens, fn, shards, rank, img_block, cap_block, device,
                  compute_dtype, sort_captions, progress, desc, stats)
    return final


def _compute_into(final, img, cap, lens, fn, shards, rank, img_block, cap_block, device,
                  compute_dtype, sort_captions, progress, desc, stats):
    """Scores this rank's rows and gathers every rank's rows into ``final`` (rank 0)."""
    world, rows = len(shards), shards[rank]
    shape = (img.shape[0], cap.shape[0])
    dtype = result_dtype(img)
    n_local = rows[1] - rows[0]
    if _fits_on_device(device, n_local * shape[1] * dtype.itemsize):
        # Tiles stay on the device (no host round trip per tile); copied out at the end.
        local = torch.empty((n_local, shape[1]), dtype=dtype, device=device)
    elif world == 1:
        local = final            # written in place: no second host copy
    else:
        local = torch.empty((n_local, shape[1]), dtype=dtype)
    write_local = _write_into(local, row_offset=rows[0])

    timer = RunTimer(device)
    score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, compute_dtype,
                 sort_captions, progress and rank == 0, desc, write_local)
    if world > 1:
        write = _write_into(final) if rank == 0 else None
        _dist.gather_rows(local, shards,
                          lambda a, b, c0, c1, blk: write(a, b, slice(c0, c1), blk))
    elif local is not final:
        _copy_rows(local, final)
    timer.finish(stats, n_local * shape[1], shape[0] * shape[1], rank, world)


def _write_into(target, row_offset: int = 0):
    """write(r0, r1, cols, block): target[r0 - row_offset : r1 - row_offset, cols] = block,
    cols a slice or an int64 NumPy array of column indices."""
    if isinstance(target, np.ndarray):
        def write(r0, r1, cols, block):
            target[r0 - row_offset:r1 - row_offset, cols] = block.cpu().numpy()
    else:
        def write(r0, r1, cols, block):
            if isinstance(cols, np.ndarray):
                cols = torch.from_numpy(cols).to(target.device, non_blocking=True)
            target[r0 - row_offset:r1 - row_offset, cols] = block.to(target.device, target.dtype)
    return write


def _fits_on_device(device, nbytes: int) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_RESULT_FRACTION * free


def _copy_rows(src: torch.Tensor, dst, rows_per_chunk: int = 256):
    """src (device) -> dst (tensor or memmap) in row chunks (bounded host memory)."""
    for r0 in range(0, src.shape[0], rows_per_chunk):
        r1 = min(src.shape[0], r0 + rows_per_chunk)
        chunk = src[r0:r1].cpu()
        if isinstance(dst, np.ndarray):
            dst[r0:r1] = chunk.numpy()
        else:
            dst[r0:r1] = chunk.to(dst.device, dst.dtype)
