"""Streamed all-pairs similarity for retrieval evaluation.

``all_pairs`` scores every (image, caption) pair of a test split in image-block x
caption-block tiles through a similarity callable (SCAN on any backend, an RCAR head, or
any ``fn(img (bi, R, d), cap (bc, L, d), lens (bc,)) -> (bi, bc)``), and writes the tiles
into one ``(n_img, n_cap)`` matrix: a tensor in memory or a ``.npy`` file written through a
memory map (to a temporary name first, renamed only when complete, so a failure never
leaves a half-written file behind). ``all_pairs_topk`` keeps only the best k captions per
image and the best k images per caption (exact; ties go to the lower index).

Bounded memory: only one caption block and (a cache of) the image rows live on the device
at a time; the full matrix stays on the host (or on disk).

Caption blocks are formed in order of caption length (``sort_captions=True``) and each
block is cut to its longest caption, so blocks of short captions do not pay for the
longest caption of the split; results go back to the original columns.

Distributed: when ``torch.distributed`` is initialised with more than one process
(``torchrun``; gloo on CPU, NCCL on GPUs), the image rows are split into one contiguous
shard per rank, every rank scores its shard against all captions, and the results are
gathered (top-k: merged) on rank 0, which returns them; the other ranks return None.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from rcar_fast import metrics as _metrics
from rcar_fast.atomic import atomic_path, check_output_path

__all__ = [
    "PROTOCOLS",
    "TopK",
    "all_pairs",
    "all_pairs_topk",
    "scan_fn",
    "rcar_fn",
    "as_similarity_fn",
    "evaluate_protocol",
    "protocols_for_size",
    "load_results",
    "save_results",
    "RESULT_FORMATS",
    "recall_from_topk",
    "shard_rows",
]

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ArrayLike = Union[torch.Tensor, np.ndarray]

# Test-set shapes: number of images (captions are 5 per image); "all": every image of a split
# of any size (what the public evalrank does with fold5=False).
PROTOCOLS = {"coco5k": 5000, "coco1k": 5000, "f30k": 1000, "all": None}
# Image rows kept on the device for the whole run when they fit in this many bytes.
IMAGE_CACHE_BYTES = 2 << 30


class TopK(NamedTuple):
    """Best k of each row / column of the similarity matrix, best first (ties: lower index).

    i2t_scores / i2t_indices: (n_img, min(k, n_cap)), caption indices per image.
    t2i_scores / t2i_indices: (n_cap, min(k, n_img)), image indices per caption."""

    i2t_scores: torch.Tensor
    i2t_indices: torch.Tensor
    t2i_scores: torch.Tensor
    t2i_indices: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Similarity callables
# ---------------------------------------------------------------------------------------------

def scan_fn(backend: str = "auto", **scan_kwargs) -> SimilarityFn:
    """fn(img, cap, lens) -> SCAN similarities through ``rcar_fast.scan_similarity``."""
    from rcar_fast import scan_similarity

    def fn(img, cap, lens):
        with torch.no_grad():
            return scan_similarity(img, cap, lens, backend=backend, **scan_kwargs)

    fn.description = f"SCAN({', '.join(f'{k}={v}' for k, v in scan_kwargs.items())}) [{backend}]"
    return fn


def rcar_fn(head: torch.nn.Module, backend: str = "auto") -> SimilarityFn:
    """fn(img, cap, lens) -> RCAR head similarities. ``RCARSimilarity`` heads run on
    ``backend``; a plain reference ``RCARHead`` runs its vectorised form ("reference" /
    "auto") or its per-caption loop ("reference_loop")."""
    takes_backend = hasattr(head, "forward") and "backend" in _parameters(head.forward)

    def fn(img, cap, lens):
        if head.training:
            raise ValueError("the RCAR head is in training mode (RAR dropout would make the "
                             "scores random); call head.eval() before evaluating")
        with torch.no_grad():
            if takes_backend:
                return head(img, cap, lens, backend=backend)
            if backend == "reference_loop":
                return head.forward_loop(img, cap, lens)
            if backend not in ("auto", "reference"):
                raise ValueError(f"a plain RCARHead runs on 'reference' or 'reference_loop', "
                                 f"not {backend!r}; use rcar_fast.RCARSimilarity for fused backends")
            return head.forward_vectorized(img, cap, lens)

    fn.description = f"RCAR({getattr(head, 'regulator', '?')}, {getattr(head, 'direction', '?')}) [{backend}]"
    return fn


def _parameters(fn) -> tuple:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def as_similarity_fn(similarity, backend: str = "auto") -> SimilarityFn:
    """"scan" (default SCAN t2i settings), an RCAR head module, or a callable."""
    if isinstance(similarity, str):
        if similarity != "scan":
            raise ValueError(f"similarity must be 'scan', an RCAR head or a callable, got {similarity!r}")
        return scan_fn(backend)
    if isinstance(similarity, torch.nn.Module) and hasattr(similarity, "sim_eval_w"):
        return rcar_fn(similarity, backend)
    if callable(similarity):
        return similarity
    raise TypeError(f"similarity must be 'scan', an RCAR head or a callable "
                    f"fn(img, cap, lens) -> (n_img, n_cap), got {type(similarity).__name__}")


# ---------------------------------------------------------------------------------------------
# Input checks (before anything is allocated or written)
# ---------------------------------------------------------------------------------------------

def _check_inputs(img, cap, lens):
    for name, x, doc in (("img", img, "(n_img, R, d)"), ("cap", cap, "(n_cap, Lmax, d)")):
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape {doc}, "
                            f"got {type(x).__name__}")
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"{name} must have a non-empty shape {doc}, got {tuple(x.shape)}")
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"img and cap must share the feature size d, got img {tuple(img.shape)} "
                         f"and cap {tuple(cap.shape)}")
    lens = torch.as_tensor(np.asarray(lens) if not isinstance(lens, torch.Tensor) else lens)
    if lens.dtype.is_floating_point or lens.dtype == torch.bool or lens.dim() != 1 \
            or lens.shape[0] != cap.shape[0]:
        raise ValueError(f"lens must be integers of shape (n_cap,) = ({cap.shape[0]},), got "
                         f"{lens.dtype} {tuple(lens.shape)}")
    lens = lens.to("cpu", torch.int64)
    if int(lens.min()) < 1 or int(lens.max()) > cap.shape[1]:
        raise ValueError(f"lens must lie in [1, Lmax={cap.shape[1]}], got min {int(lens.min())}, "
                         f"max {int(lens.max())}")
    return lens


def _check_blocks(img_block, cap_block, device):
    gpu = device.type == "cuda"
    img_block = (256 if gpu else 64) if img_block is None else img_block
    cap_block = (2048 if gpu else 512) if cap_block is None else cap_block
    for name, value in (("img_block", img_block), ("cap_block", cap_block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(img_block), int(cap_block)


def _result_dtype(img, dtype):
    if dtype is not None:
        return dtype
    return torch.float64 if img.dtype in (torch.float64, np.float64) else torch.float32


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

def _world(distributed: Optional[bool]):
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


def _comm_device():
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(local: torch.Tensor, shards: list, write, col_chunk: int = 4096):
    """Gathers every rank's rows (contiguous ``shards[rank]``) to rank 0, column chunk by
    column chunk (bounded communication buffers); rank 0 calls write(r0, r1, c0, c1, block)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), len(shards)
    comm = _comm_device()
    height = max(b - a for a, b in shards)
    n_cols = local.shape[1]
    for c0 in range(0, n_cols, col_chunk):
        c1 = min(n_cols, c0 + col_chunk)
        mine = torch.zeros((height, c1 - c0), dtype=local.dtype, device=comm)
        mine[:local.shape[0]] = local[:, c0:c1].to(comm)
        bucket = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, bucket, dst=0)
        if rank == 0:
            for (a, b), got in zip(shards, bucket):
                write(a, b, c0, c1, got[:b - a].cpu())


def _gather_all(local: torch.Tensor, world: int):
    """Every rank's equally shaped tensor, on rank 0 (a list in rank order); None elsewhere."""
    import torch.distributed as dist

    comm = _comm_device()
    mine = local.to(comm)
    bucket = [torch.empty_like(mine) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(mine, bucket, dst=0)
    return None if bucket is None else [t.cpu() for t in bucket]


# ---------------------------------------------------------------------------------------------
# Moving blocks to the device
# ---------------------------------------------------------------------------------------------

def _to_device(x, index, device, dtype, words: Optional[int] = None):
    """x[index, :words] as a tensor on device (index: slice or int64 array); np.memmap
    friendly (only the rows and words asked for are read)."""
    second = slice(None) if words is None else slice(0, words)
    if isinstance(x, np.ndarray):
        block = x[index, second]
        block = torch.from_numpy(np.ascontiguousarray(block) if block.flags.writeable
                                 else np.array(block))
    else:
        first = torch.from_numpy(index).to(x.device) if isinstance(index, np.ndarray) else index
        block = x[first, second]
    return block.to(device=device, dtype=dtype or block.dtype, non_blocking=True)


class _ImageRows:
    """Image blocks of one shard on the device; kept resident when they fit the cache."""

    def __init__(self, img, start, stop, block, device, dtype):
        self.img, self.start, self.stop, self.block = img, start, stop, block
        self.device, self.dtype = device, dtype
        itemsize = (dtype.itemsize if dtype is not None
                    else (img.element_size() if isinstance(img, torch.Tensor) else img.itemsize))
        nbytes = (stop - start) * img.shape[1] * img.shape[2] * itemsize
        self.cached = (_to_device(img, slice(start, stop), device, dtype)
                       if nbytes <= IMAGE_CACHE_BYTES and stop > start else None)

    def __iter__(self):
        for r0 in range(self.start, self.stop, self.block):
            r1 = min(self.stop, r0 + self.block)
            if self.cached is not None:
                yield r0, r1, self.cached[r0 - self.start:r1 - self.start]
            else:
                yield r0, r1, _to_device(self.img, slice(r0, r1), self.device, self.dtype)


def _caption_blocks(cap, lens, block, sort_captions, device, dtype):
    """(column indices, cap block cut to its longest caption, lens block) on the device."""
    order = (np.argsort(lens.numpy(), kind="stable") if sort_captions
             else np.arange(len(lens)))
    for c0 in range(0, len(order), block):
        cols = order[c0:c0 + block]
        # Sorted indices read a memory map sequentially.
        read = np.sort(cols)
        block_lens = lens[torch.from_numpy(read)]
        words = _to_device(cap, read, device, dtype, words=int(block_lens.max()))
        yield read, words, block_lens.to(device)


def _progress(total, enabled, desc):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="pair", unit_scale=True, desc=desc, smoothing=0.1)


def _score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, dtype,
                  sort_captions, progress, desc, sink):
    """Calls sink(r0, r1, cols (np int64), scores (r1-r0, len(cols)) on device) per tile."""
    start, stop = rows
    images = _ImageRows(img, start, stop, img_block, device, dtype)
    # Non-finite pairs are counted on the device (no sync per tile) and reported at the end.
    bad_pairs = torch.zeros((), dtype=torch.int64, device=device)
    with _progress((stop - start) * cap.shape[0], progress, desc) as bar:
        for cols, words, block_lens in _caption_blocks(cap, lens, cap_block, sort_captions,
                                                       device, dtype):
            for r0, r1, regions in images:
                scores = fn(regions, words, block_lens)
                if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (r1 - r0, len(cols)):
                    raise RuntimeError(
                        f"the similarity function returned {getattr(scores, 'shape', type(scores))} "
                        f"for a block of {r1 - r0} images x {len(cols)} captions; expected "
                        f"({r1 - r0}, {len(cols)})")
                scores = scores.detach()
                bad_pairs += (~torch.isfinite(scores)).sum().to(bad_pairs.device)
                sink(r0, r1, cols, scores)
                if bar is not None:
                    bar.update((r1 - r0) * len(cols))
    if int(bad_pairs):
        raise RuntimeError(f"the similarity function returned NaN or +-Inf for {int(bad_pairs)} "
                           f"pairs, so the ranks would be wrong (check the inputs for NaN/Inf at "
                           f"real positions, and options such as lse_lambda / smooth for "
                           f"overflow)")


# ---------------------------------------------------------------------------------------------
# Output: in memory or a .npy file written atomically
# ---------------------------------------------------------------------------------------------

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


def _check_out(out, shape, dtype):
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TypeError(f"out must be a torch.Tensor or numpy array of shape {shape}, "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape (n_img, n_cap) = {shape}, got {tuple(out.shape)}")
    floating = (out.dtype.is_floating_point if isinstance(out, torch.Tensor)
                else np.issubdtype(out.dtype, np.floating))
    if not floating:
        raise TypeError(f"out must be a floating array, got dtype {out.dtype}")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

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
    lens = _check_inputs(img, cap, lens)
    fn = as_similarity_fn(similarity, backend)
    device = _resolve_device(device)
    img_block, cap_block = _check_blocks(img_block, cap_block, device)
    rank, world = _world(distributed)
    shape = (img.shape[0], cap.shape[0])
    dtype = _result_dtype(img, None)
    if out is not None and out_path is not None:
        raise ValueError("give either out or out_path, not both")
    if out is not None:
        _check_out(out, shape, dtype)
    shards = [shard_rows(shape[0], r, world, img_block) for r in range(world)]

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
    dtype = _result_dtype(img, None)
    n_local = rows[1] - rows[0]
    if _fits_on_device(device, n_local * shape[1] * dtype.itemsize):
        # Tiles stay on the device (no host round trip per tile); copied out at the end.
        local = torch.empty((n_local, shape[1]), dtype=dtype, device=device)
    elif world == 1:
        local = final            # written in place: no second host copy
    else:
        local = torch.empty((n_local, shape[1]), dtype=dtype)
    write_local = _write_into(local, row_offset=rows[0])

    start = time.perf_counter()
    _score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, compute_dtype,
                  sort_captions, progress and rank == 0, desc, write_local)
    if world > 1:
        write = _write_into(final) if rank == 0 else None
        _gather_rows(local, shards,
                     lambda a, b, c0, c1, blk: write(a, b, slice(c0, c1), blk))
    elif local is not final:
        _copy_rows(local, final)
    _synchronize(device)
    _fill_stats(stats, time.perf_counter() - start, n_local * shape[1],
                shape[0] * shape[1], rank, world)


# Device memory the result rows may take when kept on the GPU during the run.
DEVICE_RESULT_FRACTION = 0.25


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


def all_pairs_topk(img: ArrayLike, cap: ArrayLike, lens, similarity="scan", k: int = 10, *,
                   backend: str = "auto", img_block: Optional[int] = None,
                   cap_block: Optional[int] = None, device=None,
                   compute_dtype: Optional[torch.dtype] = None, sort_captions: bool = True,
                   progress: bool = True, distributed: Optional[bool] = None,
                   stats: Optional[dict] = None, desc: str = "similarity (top-k)") -> Optional[TopK]:
    """Exact top-k retrieval lists without keeping the full matrix: the best k captions per
    image and the best k images per caption, best first, ties broken towards the lower
    index (the order of a stable descending sort of the full matrix). Same arguments as
    ``all_pairs``; returns a TopK on rank 0 (CPU tensors), None on other ranks."""
    lens = _check_inputs(img, cap, lens)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    fn = as_similarity_fn(similarity, backend)
    device = _resolve_device(device)
    img_block, cap_block = _check_blocks(img_block, cap_block, device)
    rank, world = _world(distributed)
    n_img, n_cap = img.shape[0], cap.shape[0]
    dtype = _result_dtype(img, None)
    shards = [shard_rows(n_img, r, world, img_block) for r in range(world)]
    rows = shards[rank]
    k_i2t, k_t2i = min(k, n_cap), min(k, n_img)

    i2t = _Running(rows[1] - rows[0], k_i2t, dtype, device)
    t2i = _Running(n_cap, k_t2i, dtype, device)

    def sink(r0, r1, cols, scores):
        cols_t = torch.as_tensor(cols, device=device)
        rows_t = torch.arange(r0, r1, device=device)
        i2t.merge(slice(r0 - rows[0], r1 - rows[0]), scores.to(dtype), cols_t)
        t2i.merge(cols_t, scores.to(dtype).T, rows_t)

    start = time.perf_counter()
    _score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, compute_dtype,
                  sort_captions, progress and rank == 0, desc, sink)
    i2t_scores, i2t_idx = i2t.scores.cpu(), i2t.indices.cpu()
    t2i_scores, t2i_idx = t2i.scores.cpu(), t2i.indices.cpu()
    if world > 1:
        i2t_scores, i2t_idx = _gather_topk_rows(i2t_scores, i2t_idx, shards)
        t2i_scores, t2i_idx = _merge_topk_ranks(t2i_scores, t2i_idx, k_t2i, world)
    _synchronize(device)
    _fill_stats(stats, time.perf_counter() - start, (rows[1] - rows[0]) * n_cap,
                n_img * n_cap, rank, world)
    if rank != 0:
        return None
    return TopK(i2t_scores, i2t_idx, t2i_scores, t2i_idx)


class _Running:
    """Running best-k (scores, indices) per row; merging keeps (score desc, index asc)."""

    def __init__(self, n, k, dtype, device):
        self.k = k
        self.scores = torch.full((n, k), -torch.inf, dtype=dtype, device=device)
        # Empty slots carry an index larger than any real one, so they lose every tie.
        self.indices = torch.full((n, k), torch.iinfo(torch.int64).max, dtype=torch.int64,
                                  device=device)

    def merge(self, where, scores, candidate_indices):
        """Merges scores (m, c) whose columns are candidate_indices (c,) into rows ``where``."""
        m = scores.shape[0]
        cand_scores = torch.cat([self.scores[where], scores], dim=1)
        cand_indices = torch.cat([self.indices[where], candidate_indices.expand(m, -1)], dim=1)
        best_scores, best_indices = _best_k(cand_scores, cand_indices, self.k)
        self.scores[where] = best_scores
        self.indices[where] = best_indices


def _best_k(scores, indices, k):
    """Best k per row ordered by (score desc, index asc): a lexicographic sort in two stable
    passes (index first, then score)."""
    by_index = torch.sort(indices, dim=1, stable=True).indices
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _gather_topk_rows(scores, indices, shards):
    n_img = shards[-1][1]
    got_scores = torch.empty((n_img, scores.shape[1]), dtype=scores.dtype)
    got_indices = torch.empty((n_img, scores.shape[1]), dtype=torch.int64)

    def write_scores(a, b, c0, c1, blk):
        got_scores[a:b, c0:c1] = blk

    def write_indices(a, b, c0, c1, blk):
        got_indices[a:b, c0:c1] = blk

    _gather_rows(scores, shards, write_scores)
    _gather_rows(indices, shards, write_indices)
    import torch.distributed as dist

    return (got_scores, got_indices) if dist.get_rank() == 0 else (None, None)


def _merge_topk_ranks(scores, indices, k, world):
    all_scores, all_indices = _gather_all(scores, world), _gather_all(indices, world)
    if all_scores is None:
        return None, None
    return _best_k(torch.cat(all_scores, dim=1), torch.cat(all_indices, dim=1), k)


def _resolve_device(device) -> torch.device:
    """The compute device; refuses a CUDA device that this machine does not have."""
    if device is None:
        return _default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here (no GPU "
                             f"or a CPU-only torch); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def _default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fill_stats(stats, seconds, local_pairs, pairs, rank, world):
    if stats is None:
        return
    stats.update(seconds=seconds, pairs=pairs, local_pairs=local_pairs, rank=rank, world=world,
                 pairs_per_s=local_pairs / seconds if seconds > 0 else float("inf"))


# ---------------------------------------------------------------------------------------------
# Metrics per protocol
# ---------------------------------------------------------------------------------------------

def evaluate_protocol(sims, protocol: str, captions_per_image: int = 5, strict: bool = True,
                      fold_size: Optional[int] = None, return_folds: bool = False):
    """Metrics of one published protocol: "coco5k" (all 5000 images), "coco1k" (5 folds of
    1000 averaged) or "f30k" (1000 images). With strict=True the matrix must have the
    protocol's size; strict=False evaluates any size (coco1k: folds of ``fold_size`` images,
    by default 1000, or a fifth of the images when they are not a multiple of 1000).
    ``return_folds`` (coco1k only): returns (mean, [metrics of each fold])."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    n_img = sims.shape[0]
    if protocol == "all":
        return _metrics.recall_metrics(sims, captions_per_image)
    if strict and n_img != PROTOCOLS[protocol]:
        raise ValueError(f"protocol {protocol!r} expects {PROTOCOLS[protocol]} images and "
                         f"{captions_per_image * PROTOCOLS[protocol]} captions, got a similarity "
                         f"matrix of shape {tuple(sims.shape)}")
    if protocol == "coco1k":
        if fold_size is None:
            fold_size = coco1k_fold_size(n_img, strict)
        return _metrics.coco1k_metrics(sims, captions_per_image, fold_size=fold_size,
                                       return_folds=return_folds)
    return _metrics.recall_metrics(sims, captions_per_image)


def coco1k_fold_size(n_img: int, strict: bool = True) -> int:
    """Images per fold of the 1K protocol: 1000, or (strict=False, a size that is not a
    multiple of 1000) a fifth of the images."""
    return 1000 if strict or n_img % 1000 == 0 or n_img % 5 else n_img // 5


def recall_from_topk(topk: TopK, captions_per_image: int = 5) -> dict:
    """R@K (K <= k) in both directions from top-k lists, plus rsum when k >= 10. Equals
    recall_metrics except where a tie straddles the ground truth (top-k lists order ties by
    index; recall_metrics counts ties against the ground truth)."""
    n_img, n_cap = topk.i2t_indices.shape[0], topk.t2i_indices.shape[0]
    if n_cap != captions_per_image * n_img:
        raise ValueError(f"top-k lists for {n_img} images and {n_cap} captions do not match "
                         f"{captions_per_image} captions per image")
    own_image_of_caption = topk.i2t_indices // captions_per_image
    i2t_hit = own_image_of_caption == torch.arange(n_img)[:, None]
    t2i_hit = topk.t2i_indices == (torch.arange(n_cap) // captions_per_image)[:, None]
    out = {}
    for name, hit in (("i2t", i2t_hit), ("t2i", t2i_hit)):
        for K in _metrics.RECALL_KS:
            if K <= hit.shape[1]:
                out[f"{name}_r{K}"] = 100.0 * int(hit[:, :K].any(1).sum()) / hit.shape[0]
    if all(f"{d}_r{K}" in out for d in ("i2t", "t2i") for K in _metrics.RECALL_KS):
        out["rsum"] = sum(out[f"{d}_r{K}"] for d in ("i2t", "t2i") for K in _metrics.RECALL_KS)
    return out


def protocols_for_size(n_img: int) -> list:
    """The protocols a split of ``n_img`` images is evaluated with when none is named:
    COCO 5K test (5000 images): coco5k and its 1K folds (coco1k); 1000 images (Flickr30K
    test, COCO 1K): f30k; any other size: all images at once ("all")."""
    if n_img == PROTOCOLS["coco5k"]:
        return ["coco5k", "coco1k"]
    if n_img == PROTOCOLS["f30k"]:
        return ["f30k"]
    return ["all"]


# ---------------------------------------------------------------------------------------------
# Saved results: a bare (n_img, n_cap) matrix, or the public {'npts', 'sims'} dict
# ---------------------------------------------------------------------------------------------

# "matrix": np.save of the (n_img, n_cap) matrix; "public": np.save of
# {'npts': n_img, 'sims': float64 matrix}, the results_{data_name}.npy that the public RCAR
# evalrank writes and eval_ensemble reads.
RESULT_FORMATS = ("matrix", "public")


def save_results(path, sims, fmt: str = "matrix") -> None:
    """Writes a similarity matrix atomically in one of RESULT_FORMATS."""
    from rcar_fast import data

    if fmt not in RESULT_FORMATS:
        raise ValueError(f"format must be one of {RESULT_FORMATS}, got {fmt!r}")
    array = sims.detach().cpu().numpy() if isinstance(sims, torch.Tensor) else np.asarray(sims)
    if fmt == "public":
        data.save_npy(path, {"npts": int(array.shape[0]), "sims": array.astype(np.float64)})
    else:
        data.save_npy(path, array)


def load_results(path, captions_per_image: int = 5) -> np.ndarray:
    """A saved similarity matrix: a bare .npy matrix (memory-mapped) or the public
    ``{'npts', 'sims'}`` dict (as the public eval_ensemble reads it; its pickle is loaded
    only for that layout, a dict of an int and an array). Raises ValueError naming the
    file for anything else."""
    from rcar_fast import data

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    if _holds_a_pickle(path):
        sims = _load_public_results(path)
    else:
        sims = data.load_npy(path, mmap=True)
    if sims.ndim != 2 or not (np.issubdtype(sims.dtype, np.floating)):
        raise ValueError(f"{path} must hold a floating (n_img, n_cap) similarity matrix, got "
                         f"dtype {sims.dtype} and shape {sims.shape}")
    if sims.shape[1] != captions_per_image * sims.shape[0]:
        raise ValueError(f"{path} holds a {sims.shape} matrix; expected (n_img, "
                         f"{captions_per_image} * n_img)")
    return sims


def _holds_a_pickle(path) -> bool:
    """Whether a .npy file stores a pickled object (dtype object) rather than numbers."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            _, _, dtype = _read_header(version)(f)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy file: {err}") from None
    return dtype.hasobject


def _read_header(version):
    return (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)


def _load_public_results(path):
    import pickle

    try:
        with open(path, "rb") as f:
            content = _PublicResultsUnpickler.load_npy(f)
    except (pickle.UnpicklingError, ValueError, EOFError, AttributeError, ImportError) as err:
        raise ValueError(f"{path} is neither a similarity matrix nor the public "
                         f"{{'npts', 'sims'}} results dict ({type(err).__name__}: {err})") from None
    if isinstance(content, np.ndarray) and content.shape == () and content.dtype.hasobject:
        content = content.item()             # np.save wraps the dict in a 0-d object array
    if not (isinstance(content, dict) and set(content) == {"npts", "sims"}
            and isinstance(content["sims"], np.ndarray)):
        raise ValueError(f"{path} holds a pickled object that is not the public "
                         f"{{'npts', 'sims'}} results dict")
    sims, npts = content["sims"], content["npts"]
    if sims.ndim != 2 or int(npts) != sims.shape[0]:
        raise ValueError(f"{path}: npts = {npts} but sims has shape {sims.shape}")
    return sims


class _PublicResultsUnpickler:
    """Reads np.save({'npts', 'sims'}) without running arbitrary pickles: only the numpy
    array reconstruction and scalar types are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    @classmethod
    def load_npy(cls, f):
        import pickle

        shape, _, dtype = _read_header(np.lib.format.read_magic(f))(f)
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(f"expected a pickled object, got dtype {dtype} shape {shape}")
        allowed = cls._ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in allowed:
                    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
                return super().find_class(module, name)

        return Restricted(f).load()
