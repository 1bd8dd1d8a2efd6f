"""RAR's dropout as a counter-based mask: the one definition shared by the fused kernels
(csrc/cpu/rcar.cpp, rar_dropout_row_key / rar_dropout_scales, the same arithmetic) and the
reference (through `counter_masks`, so a test compares a kernel with the reference exactly).

An element is named by (seed, module, which, pair, row, channel): module the RAR module's index,
which 0 for rar_k_w's output (row = the pair's query row) or 1 for rar_q_w's (row 0), pair the
global pair id i * n_cap + j, channel the sim_dim index. Its 32-bit hash (a fold of the counters
through a 32-bit integer mixer) is compared with p * 2^32: kept elements are scaled by 1/(1-p),
dropped ones are 0. Nothing is stored: a backward recomputes the forward's masks from the seed.

All arithmetic here is int64 on values below 2^32 times a multiplier below 2^27, so it never
overflows and equals the C++ uint32 arithmetic bit for bit.
"""
from __future__ import annotations

import contextlib

import torch

from rcar_fast.contract import DROPOUT_HASH_MULTIPLIER, RAR_DROPOUT_P, RAR_DROPOUT_THRESHOLD

P = RAR_DROPOUT_P                        # nn.Dropout(0.4) of rar_q_w / rar_k_w
THRESHOLD = RAR_DROPOUT_THRESHOLD        # kept iff hash >= THRESHOLD
_MASK32 = 0xFFFFFFFF
_MULTIPLIER = DROPOUT_HASH_MULTIPLIER


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def _mix_in(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Folds a non-negative 64-bit counter v into the hash state h: low word, then high word."""
    h = hash32(h ^ (v & _MASK32))
    return hash32(h ^ (v >> 32))


def row_keys(seed: int, module: int, which: int, pair, row) -> torch.Tensor:
    """The hash state of each (pair, row) (int64 tensors that broadcast, values >= 0)."""
    pair, row = (torch.as_tensor(x, dtype=torch.int64) for x in (pair, row))
    h = _mix_in(torch.zeros((), dtype=torch.int64), torch.tensor(int(seed), dtype=torch.int64))
    h = _mix_in(h, torch.tensor(2 * int(module) + int(which), dtype=torch.int64))
    return _mix_in(_mix_in(h, pair), row)


def scales(keys: torch.Tensor, channels: int, dtype=torch.float64) -> torch.Tensor:
    """keys (...) -> (..., channels): 0 where dropped, 1/(1-p) where kept, in dtype."""
    channel = torch.arange(int(channels), dtype=torch.int64, device=keys.device)
    kept = hash32(keys.unsqueeze(-1) ^ channel) >= THRESHOLD
    keep = torch.full((), 1.0 / (1.0 - P), dtype=torch.float64).to(dtype)
    return torch.where(kept, keep.to(keys.device), torch.zeros((), dtype=dtype, device=keys.device))


def rar_scales(seed: int, module: int, which: int, pairs, rows: int, channels: int,
               dtype=torch.float64) -> torch.Tensor:
    """The scales of `pairs` (int64 (n,)) for rows 0..rows-1: (n, rows, channels)."""
    pairs = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 1)
    return scales(row_keys(seed, module, which, pairs, torch.arange(int(rows))), channels, dtype)


# --------------------------------------------------------------------------------------------
# The reference's hook
# --------------------------------------------------------------------------------------------

_ACTIVE: list = []


@contextlib.contextmanager
def counter_masks(seed: int, pair_ids: torch.Tensor):
    """Within this block, the reference's RAR modules (heads.AggregationRegulator, in training
    mode) use these masks instead of nn.Dropout's random ones. pair_ids (int64): the global pair
    id of each pair of the reference's one block, shaped like the block's pair dims, e.g.
    i * n_cap + j of shape (n_img, n_cap) for head.forward_vectorized(img, cap, lens,
    img_chunk=n_img, cap_chunk=n_cap) (one block of all pairs, either direction)."""
    _ACTIVE.append((int(seed), torch.as_tensor(pair_ids, dtype=torch.int64)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_rar_masks(module: int, mid: torch.Tensor):
    """(key scales (..., Q, s), question scales (..., s)) of RAR module `module` for the mid
    set mid (..., Q, s) inside `counter_masks`; None outside it."""
    if not _ACTIVE:
        return None
    seed, pair_ids = _ACTIVE[-1]
    pair_dims, (n_rows, channels) = mid.shape[:-2], mid.shape[-2:]
    if tuple(pair_dims) != tuple(pair_ids.shape):
        raise ValueError(f"counter_masks: the reference scored a block of pairs {tuple(pair_dims)}, "
                         f"but pair_ids has shape {tuple(pair_ids.shape)}; score all pairs in one block")
    pair_ids = pair_ids.to(mid.device)
    rows = torch.arange(n_rows, dtype=torch.int64, device=mid.device)
    keys = scales(row_keys(seed, module, 0, pair_ids.unsqueeze(-1), rows), channels, mid.dtype)
    questions = scales(row_keys(seed, module, 1, pair_ids, 0), channels, mid.dtype)
    return keys, questions
