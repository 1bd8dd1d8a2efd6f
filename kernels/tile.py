"""The region-word score tile, shared by every Triton head (kernels/scan.py, kernels/maxsim.py).

A tile is BI owners of one side (images, or captions for SCAN's i2t) x BJ owners of the other.
Each owner's items (regions, words) are padded to a power of two (C_PAD and Q_PAD rows), so the
tile's scores are one (BI*C_PAD, BJ*Q_PAD) tl.dot GEMM over d with fp32 (fp64) accumulation,
which a head reshapes to (BI, C_PAD, BJ, Q_PAD) and reduces per pair in registers. Padding rows
are masked at load time: they are never read (NaN there is harmless) and score 0, which every
head must still mask out of its reductions.

Device side (inlined into the kernels): `tile_owners`, `tile_rows`, `score_tile`, `add_rows`
(the backward's d-chunked row updates), `tile_start`, and the Gram identity's pieces
(|sum_k a_k y_k|^2 = a^T G a without the attended vectors: SCAN, CHAN's VSA): `load_gram`,
`halves_dot`, `add_gram_rows`.
Host side: `context_gram`, owner groups (owners bucketed by their power-of-two padding, one launch per bucket),
the tile shapes a budget allows, and the autotune mode (RCAR_FAST_AUTOTUNE).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from . import gram as _gram

# tl.dot needs every dimension >= 16 (on GPUs and in the interpreter).
MIN_DOT = 16


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# =============================================================================================
# Device helpers
# =============================================================================================

@triton.jit
def tile_owners(ids_ptr, lens_ptr, start, count, OWNERS: tl.constexpr):
    """ids (int64) and lengths of OWNERS owners from `start`, and which are real. Owners past
    `count` are clamped to the last real one, so their loads stay valid; results are masked."""
    o = start + tl.arange(0, OWNERS)
    real = o < count
    o = tl.minimum(o, count - 1)
    return tl.load(ids_ptr + o).to(tl.int64), tl.load(lens_ptr + o), real


@triton.jit
def tile_rows(ids_ptr, lens_ptr, start, count, s0, s1, OWNERS: tl.constexpr, PAD: tl.constexpr):
    """For the OWNERS*PAD rows of a tile: offset of each row (owner, item) and whether it is a
    real item of a real owner (everything else is masked: never loaded, never stored)."""
    r = tl.arange(0, OWNERS * PAD)
    owner = start + r // PAD
    item = r % PAD
    clamped = tl.minimum(owner, count - 1)
    ident = tl.load(ids_ptr + clamped).to(tl.int64)
    length = tl.load(lens_ptr + clamped)
    return ident * s0 + item * s1, (item < length) & (owner < count)


@triton.jit
def score_tile(x_ptr, x_rows, x_ok, sxd, y_ptr, y_rows, y_ok, syd, D,
               M: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
               MAIN_PREC: tl.constexpr):
    """S[m, n] = x_row(m) . y_row(n) over d: the (M, N) region-word GEMM, ACC accumulation,
    in d-chunks of BK. Rows that are not ok are not read and score 0."""
    acc = tl.zeros((M, N), dtype=ACC)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kin = kk < D
        a = tl.load(x_ptr + x_rows[:, None] + kk[None, :] * sxd,
                    mask=x_ok[:, None] & kin[None, :], other=0.0)
        b = tl.load(y_ptr + y_rows[:, None] + kk[None, :] * syd,
                    mask=y_ok[:, None] & kin[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=MAIN_PREC)
    return acc


@triton.jit
def add_rows(dst_ptr, dst_rows, dst_ok, src_ptr, src_rows, src_ok, sd, coef, D, accumulate,
             BD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """dst[rows] (+)= coef @ src[rows] over d in chunks of BD, coef (dst rows, src rows) in ACC;
    stores (first iteration) or, if `accumulate`, read-modify-writes the rows this program
    owns."""
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        din = dd < D
        chunk = tl.load(src_ptr + src_rows[:, None] + dd[None, :] * sd,
                        mask=src_ok[:, None] & din[None, :], other=0.0).to(ACC)
        part = tl.dot(coef, chunk, input_precision=PREC)
        ptrs = dst_ptr + dst_rows[:, None] + dd[None, :]
        out_mask = dst_ok[:, None] & din[None, :]
        prev = tl.load(ptrs, mask=out_mask & accumulate, other=0.0)
        tl.store(ptrs, prev + part, mask=out_mask)


@triton.jit
def load_gram(g_ptr, gs0, gs1, ids_ptr, lens_ptr, start, count,
              OWNERS: tl.constexpr, PAD: tl.constexpr):
    """The Gram matrices of OWNERS owners from `start` (g (n, PAD+, PAD+), rows gs0, gs1) as one
    block-diagonal (OWNERS*PAD, OWNERS*PAD) matrix, zero off the diagonal blocks and outside
    real items. (A 2D dot with it keeps the MMA layout spread over all warps; a batched 3D dot
    over few owners replicates it across warps.)"""
    r = tl.arange(0, OWNERS * PAD)
    owner = start + r // PAD
    item = r % PAD
    clamped = tl.minimum(owner, count - 1)
    ident = tl.load(ids_ptr + clamped).to(tl.int64)
    real = item < tl.load(lens_ptr + clamped)
    same = owner[:, None] == owner[None, :]
    ptrs = g_ptr + ident[:, None] * gs0 + item[:, None] * gs1 + item[None, :]
    return tl.load(ptrs, mask=same & real[:, None] & real[None, :], other=0.0)


@triton.jit
def halves_dot(a, b, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    """a @ b, (M, K) x (K, N), for the epilogues' fp32 products. The IEEE fp32 dot (FMA) holds
    whole K rows of its operands in each thread's registers, which at K = 64 spills; there the
    product runs as two K halves chained in one accumulator: the same sequential sum over K."""
    if PREC == "ieee" and K >= 64:
        a_lo, a_hi = tl.split(tl.permute(tl.reshape(a, (M, 2, K // 2)), (0, 2, 1)))
        b_lo, b_hi = tl.split(tl.permute(tl.reshape(b, (2, K // 2, N)), (1, 2, 0)))
        out = tl.dot(a_lo, b_lo, input_precision=PREC)
        out = tl.dot(a_hi, b_hi, out, input_precision=PREC)
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def add_gram_rows(dst_ptr, dst_rows, src_ptr, src_rows, ok, sd, dgram, D, BD: tl.constexpr,
                  PREC: tl.constexpr, ACC: tl.constexpr, M: tl.constexpr, PAD: tl.constexpr):
    """The Gram term of a backward: dst[rows] += 2 dG @ src[rows], the M = owners x PAD rows of
    the program's owners (dst and src: their gradient and feature rows; dG (M, M) symmetric,
    summed over the owners' pairs), within each owner's diagonal block only: the other blocks
    mix owners. The 2 scales dG exactly (a power of two)."""
    r = tl.arange(0, M)
    dgram = tl.where((r // PAD)[:, None] == (r // PAD)[None, :], 2.0 * dgram, 0.0)
    add_rows(dst_ptr, dst_rows, ok, src_ptr, src_rows, ok, sd, dgram, D, True, BD, PREC, ACC)


@triton.jit
def tile_start(pid, n_x, n_y, BI: tl.constexpr, BJ: tl.constexpr, GROUP: tl.constexpr):
    """Grouped order of the (x block, y block) tiles: GROUP x blocks sweep the y blocks
    together, so their operands stay in L2."""
    tiles_x = tl.cdiv(n_x, BI)
    tiles_y = tl.cdiv(n_y, BJ)
    per_group = GROUP * tiles_y
    first_x = (pid // per_group) * GROUP
    group_size = tl.minimum(tiles_x - first_x, GROUP)
    tx = first_x + (pid % per_group) % group_size
    ty = (pid % per_group) // group_size
    return tx * BI, ty * BJ


# =============================================================================================
# Host side: `context_gram`, owner groups, tile shapes, autotune mode
# =============================================================================================

def pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


@dataclasses.dataclass
class OwnerGroup:
    """The owners (images or captions) of one launch on one side: their row ids in the input,
    their lengths, and the power-of-two padding of their items."""
    ids: torch.Tensor    # int32, on the device
    lens: torch.Tensor   # int32, on the device, same order as ids
    pad: int
    count: int


def context_gram(x: torch.Tensor) -> torch.Tensor:
    """Per-owner Gram matrices (n, M, M) of x (n, M, d) in the accumulation dtype (fp32, fp64
    for fp64 inputs). NaN in padding only reaches padding rows/columns, which the kernels never
    load (load_gram)."""
    if x.dtype == torch.float64:
        return torch.bmm(x, x.transpose(1, 2))
    return _gram.gram(x)


def caption_groups(lens_cpu: torch.Tensor, device, floor: int) -> list:
    """Owners sorted by length, split where the power-of-two padding changes."""
    order = torch.argsort(lens_cpu, stable=True)
    sorted_lens = lens_cpu[order]
    pads = torch.tensor([pow2_at_least(v, floor) for v in sorted_lens.tolist()])
    groups = []
    for pad in torch.unique(pads).tolist():
        sel = pads == pad
        groups.append(OwnerGroup(order[sel].to(device=device, dtype=torch.int32),
                                 sorted_lens[sel].to(device=device, dtype=torch.int32),
                                 int(pad), int(sel.sum())))
    return groups


def tile_shapes(c_pad: int, q_pad: int, max_m: int, max_n: int, max_area: int, min_area: int):
    """(BI, BJ) whose tile (BI*C_PAD, BJ*Q_PAD) satisfies tl.dot's minimum of 16 and the
    budget; empty when even the smallest tile (smallest_shape) exceeds it."""
    shapes = []
    for bi in (1, 2, 4, 8, 16):
        for bj in (1, 2, 4, 8, 16, 32):
            m, n = bi * c_pad, bj * q_pad
            if MIN_DOT <= m <= max_m and MIN_DOT <= n <= max_n and min_area <= m * n <= max_area:
                shapes.append((bi, bj))
    return shapes


def smallest_shape(c_pad: int, q_pad: int):
    return max(1, MIN_DOT // c_pad), max(1, MIN_DOT // q_pad)


# The (BI, BJ) owners per tile that the autotune config lists start from (the prunes keep
# those whose tile fits the kernel's budget).
OWNER_SHAPES = [(bi, bj) for bi in (1, 2, 4, 8, 16) for bj in (1, 2, 4, 8, 16, 32)]


def precision_kind(x: torch.Tensor) -> str:
    """'low' for fp16/bf16 inputs (tensor-core dots), 'fp32' for the IEEE fp32 (FMA) path
    (fp32 inputs; fp64 under the interpreter): the budgets' two kinds."""
    return "low" if x.dtype in (torch.float16, torch.bfloat16) else "fp32"


def config_area(x_pad: int, y_pad: int):
    """A config's tile area (BI*x_pad rows x BJ*y_pad columns), as a function of the config."""
    return lambda c: c.kwargs["BI"] * x_pad * c.kwargs["BJ"] * y_pad


def named(args, kwargs):
    """An autotune prune's named arguments and constexprs as one dict."""
    merged = dict(args)
    merged.update(kwargs)
    return merged


AUTOTUNE_VARIABLE = "RCAR_FAST_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """'full' (RCAR_FAST_AUTOTUNE unset, empty or 'full': every config the prunes keep, the
    users' default) or 'quick' (one default config per kernel and bucket: tests and GPU
    checks, which would otherwise compile hundreds of configs). Anything else is an error."""
    raw = os.environ.get(AUTOTUNE_VARIABLE, "")
    mode = raw.strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_VARIABLE}={raw!r} is not understood: expected 'quick' "
                         "(one autotune config per kernel, for tests and checks) or 'full' / "
                         "unset (full autotuning, the default)")
    return mode


def quick(configs, area_of):
    """Quick mode: the config with the largest tile (the most reuse of each loaded operand),
    ties broken by fewer warps and the larger d-chunk. One compile per kernel and bucket
    (triton 3.8 then skips the benchmark; 3.6 times the one config once)."""
    if autotune_mode() != "quick":
        return configs
    best = min(configs, key=lambda c: (-area_of(c), c.num_warps, -c.kwargs.get("BD", 0)))
    return [best]
