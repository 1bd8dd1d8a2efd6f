"""The tile loop every all-pairs entry point runs: image-block x caption-block tiles of one
shard of image rows, scored by a similarity callable and handed to a sink.

Bounded memory: only one caption block and (a cache of) the image rows live on the device
at a time. Caption blocks are formed in order of caption length (``sort_captions=True``)
and each block is cut to its longest caption, so blocks of short captions do not pay for
the longest caption of the split; the sink receives the original column indices.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np
import torch

# Image rows kept on the device for the whole run when they fit in this many bytes.
IMAGE_CACHE_BYTES = 2 << 30


def to_device(x, index, device, dtype, words: Optional[int] = None):
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
        self.cached = (to_device(img, slice(start, stop), device, dtype)
                       if nbytes <= IMAGE_CACHE_BYTES and stop > start else None)

    def __iter__(self):
        for r0 in range(self.start, self.stop, self.block):
            r1 = min(self.stop, r0 + self.block)
            if self.cached is not None:
                yield r0, r1, self.cached[r0 - self.start:r1 - self.start]
            else:
                yield r0, r1, to_device(self.img, slice(r0, r1), self.device, self.dtype)


def _caption_blocks(cap, lens, block, sort_captions, device, dtype):
    """(column indices, cap block cut to its longest caption, lens block) on the device."""
    order = (np.argsort(lens.numpy(), kind="stable") if sort_captions
             else np.arange(len(lens)))
    for c0 in range(0, len(order), block):
        cols = order[c0:c0 + block]
        # Sorted indices read a memory map sequentially.
        read = np.sort(cols)
        block_lens = lens[torch.from_numpy(read)]
        words = to_device(cap, read, device, dtype, words=int(block_lens.max()))
        yield read, words, block_lens.to(device)


def _progress(total, enabled, desc):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="pair", unit_scale=True, desc=desc, smoothing=0.1)


def score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, dtype,
                 sort_captions, progress, desc, sink):
    """Calls sink(r0, r1, cols (np int64), scores (r1-r0, len(cols)) on device) per tile of
    the image rows [rows[0], rows[1]); raises if any score is NaN or +-Inf."""
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


class RunTimer:
    """Wall time of a run up to its results being on the host, into the ``stats`` dict."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def finish(self, stats: Optional[dict], local_pairs: int, pairs: int, rank: int, world: int):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if stats is None:
            return
        seconds = time.perf_counter() - self.start
        stats.update(seconds=seconds, pairs=pairs, local_pairs=local_pairs, rank=rank, world=world,
                     pairs_per_s=local_pairs / seconds if seconds > 0 else float("inf"))
