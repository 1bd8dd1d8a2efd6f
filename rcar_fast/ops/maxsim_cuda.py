"""The S-only heads (max_similarity, op "maxsim") on the CUDA kernels of csrc/cuda/maxsim.cu,
as the custom op rcar_fast::maxsim_cuda (and its _backward).

Forward: the shared region-word tile (csrc/cuda/tile.cuh, the one SCAN's CUDA kernel uses) with
the heads' per-pair epilogue: maxima with their first argmax, leaky, pools, padding never read.

Backward (flash style: nothing is kept from the forward): the tile and every argmax are
recomputed; per image chunk the kernel writes one coefficient and one argmax index per pooled
maximum (t2i: (images, packed words), i2t: (image rows, captions)), and two contraction kernels
turn them into d img (owned per image) and d cap (owned per caption, image chunks added in
order). No atomics: gradients are bitwise deterministic. The chunk keeps those buffers below
COEFFICIENT_BUFFER_BYTES. Gradients are computed in float32 and returned in the input dtype
(as the custom op's fake says); padding gets exactly zero.

Dtypes: float32 (fp32 FMA scores), float16 and bfloat16 (tensor-core scores, fp32 accumulation);
output float32. Shape limits: the tile's (R <= 160 with captions up to 128 words, R <= 320 with
up to 64, R <= 640 with up to 32); extra_reasons reports them before anything launches.

CHAN's VSA coding (coding="vsa", i2t; the op rcar_fast::maxsim_vsa_cuda): the same tile, each
region's code from the caption's word Gram (csrc/cuda/gram.cu); its backward kernel writes SCAN
i2t's per-pair buffers (dL/dS, a, 2 dL/d|c|^2 a), contracted here by scan_cuda's
GradientAccumulator (cuBLAS GEMMs, no atomics: deterministic run to run).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from rcar_fast import contract
from rcar_fast.ops.backend import BackendUnavailable, Inputs, native
from rcar_fast.ops.library import MAXSIM_OPTION_NAMES, define_maxsim_op
from rcar_fast.ops.scan_cuda import (COL_FRAGS, DTYPE_CODES, CudaTileBackend, GradientAccumulator,
                                     PairGrads, backward_image_chunk as scan_backward_image_chunk,
                                     caption_grams, caption_groups)
from rcar_fast.reference_heads import zero_padding

# Upper bound for one image chunk's coefficient and argmax buffers in the backward.
COEFFICIENT_BUFFER_BYTES = 512 * 2**20


class Options(NamedTuple):
    direction: str
    pool: str
    tau: float
    leaky: bool
    both_scale: float
    coding: str = "max"
    vsa_tau: float = contract.CHAN_TAU

    @property
    def vsa(self) -> bool:
        return self.coding == "vsa"

    @property
    def t2i(self) -> bool:
        return self.direction != "i2t"

    @property
    def i2t(self) -> bool:
        return self.direction != "t2i"


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index rows with arbitrary strides but read each feature vector contiguously.
    return x if x.stride(2) == 1 else x.contiguous()


def tile_shape_rejection(R: int, max_len: int) -> Optional[str]:
    """Why no tile shape holds R regions and a caption of max_len words (None if one does)."""
    rows, cols = native().scan_tile_rows, native().scan_tile_cols
    if any(R <= rows(c) and max_len <= cols(c) for c in COL_FRAGS):
        return None
    limits = ", ".join(f"R <= {rows(c)} with captions <= {cols(c)} words" for c in COL_FRAGS)
    return (f"the CUDA maxsim kernel's tile cannot hold R={R} regions with a caption of {max_len} "
            f"words (supported: {limits}); use backend='triton', 'cpu' or 'reference'")


def tile_col_frags(R: int, max_len: int) -> int:
    """The widest tile shape whose rows hold R regions and whose columns the longest caption."""
    rows, cols = native().scan_tile_rows, native().scan_tile_cols
    for col_frags in COL_FRAGS:
        if R <= rows(col_frags) and max_len <= cols(col_frags):
            return col_frags
    raise BackendUnavailable(tile_shape_rejection(R, max_len))


@dataclasses.dataclass
class Captions:
    """The packed-caption tables of one call (forward, or every backward chunk)."""
    cap: torch.Tensor           # (n_cap, Lmax, d), rows contiguous
    lens: torch.Tensor          # (n_cap,) int64 on the device
    word_off: torch.Tensor      # (n_cap + 1,) int64
    total_words: int
    max_len: int
    col_frags: int
    group_first: torch.Tensor   # (n_groups + 1,) int32
    lens_host: list
    gram: Optional[torch.Tensor] = None      # vsa: packed caption Grams (scan_cuda.caption_grams)
    gram_off: Optional[torch.Tensor] = None


def prepare_captions(cap: torch.Tensor, lens: torch.Tensor, R: int, vsa: bool = False) -> Captions:
    device = cap.device
    cap = _rows_contiguous(cap)
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    lens_host = [int(v) for v in lens.cpu().tolist()]
    word_off = torch.zeros(len(lens_host) + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=word_off[1:])
    max_len = max(lens_host)
    col_frags = tile_col_frags(R, max_len)
    group_first = torch.tensor(caption_groups(lens_host, native().scan_tile_cols(col_frags)),
                               dtype=torch.int32, device=device)
    gram, gram_off = caption_grams(cap, lens, lens_host) if vsa else (None, None)
    return Captions(cap, lens, word_off, sum(lens_host), max_len, col_frags, group_first, lens_host,
                    gram, gram_off)


def native_problem(img: torch.Tensor, img_lens: torch.Tensor, caps: Captions, options: Options):
    """The typed MaxSimProblemCuda (csrc/cuda/kernels.h) of img (all of it, or a chunk) and caps."""
    n_img, R, d = img.shape
    cap = caps.cap
    return native().MaxSimProblemCuda(
        img=img.data_ptr(), cap=cap.data_ptr(), dtype=DTYPE_CODES[img.dtype],
        n_img=n_img, R=R, d=d, n_cap=cap.shape[0],
        img_stride_n=img.stride(0), img_stride_r=img.stride(1),
        cap_stride_n=cap.stride(0), cap_stride_w=cap.stride(1),
        img_lens=img_lens.data_ptr(), lens=caps.lens.data_ptr(), word_off=caps.word_off.data_ptr(),
        total_words=caps.total_words, max_len=caps.max_len,
        group_first=caps.group_first.data_ptr(), n_groups=caps.group_first.numel() - 1,
        col_frags=caps.col_frags, direction=contract.HEAD_DIRECTION_CODES[options.direction],
        pool=contract.POOL_CODES[options.pool], leaky=int(bool(options.leaky)),
        tau=float(options.tau), both_scale=float(options.both_scale), vsa=int(options.vsa),
        vsa_tau=float(options.vsa_tau), gram=0 if caps.gram is None else caps.gram.data_ptr(),
        gram_off=0 if caps.gram_off is None else caps.gram_off.data_ptr())


def shape_problem(inputs: Inputs, longest: int):
    """A MaxSimProblemCuda with the shapes of `inputs` and null pointers, for the launch check
    alone (it reads no memory): the same limits the launchers enforce, before any launch."""
    (n_img, R, d), (n_cap, Lmax, _) = inputs.img_shape, inputs.cap_shape
    return native().MaxSimProblemCuda(
        img=0, cap=0, dtype=DTYPE_CODES.get(inputs.dtype, -1), n_img=n_img, R=R, d=d, n_cap=n_cap,
        img_stride_n=R * d, img_stride_r=d, cap_stride_n=Lmax * d, cap_stride_w=d, img_lens=0, lens=0,
        word_off=0, total_words=n_cap * longest, max_len=longest, group_first=0, n_groups=max(n_cap, 1),
        col_frags=tile_col_frags(R, longest),
        direction=contract.HEAD_DIRECTION_CODES.get(inputs.direction or "t2i", 0),
        pool=contract.POOL_CODES["mean"], leaky=0, tau=1.0, both_scale=1.0, vsa=0, vsa_tau=1.0, gram=0,
        gram_off=0)


def _image_lens(img_lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return img_lens.to(device=device, dtype=torch.int64).contiguous()


def maxsim_forward(img, cap, lens, img_lens, options: Options,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sims (n_img, n_cap) float32; `out`, when given, is written in place (tests poison it)."""
    img = _rows_contiguous(img)
    caps = prepare_captions(cap, lens, img.shape[1], options.vsa)
    img_lens = _image_lens(img_lens, img.device)
    if out is None:
        out = torch.empty((img.shape[0], cap.shape[0]), dtype=torch.float32, device=img.device)
    native().maxsim_forward_cuda(native_problem(img, img_lens, caps, options), out.data_ptr(),
                                 _stream(img.device))
    return out


def backward_image_chunk(n_img: int, R: int, total_words: int, n_cap: int, options: Options,
                         budget: Optional[int] = None) -> int:
    """Images per backward chunk so that the coefficient buffers stay below the budget."""
    budget = COEFFICIENT_BUFFER_BYTES if budget is None else budget
    per_image = 8 * (total_words * options.t2i + R * n_cap * options.i2t)  # float32 + int32
    return max(1, min(n_img, budget // max(per_image, 1)))


def maxsim_backward(grad_sims, img, cap, lens, img_lens, options: Options):
    """(d img, d cap) in the input dtype; zero at padded regions and words."""
    grad_sims = grad_sims.to(torch.float32).contiguous()
    img = _rows_contiguous(img)
    caps = prepare_captions(cap, lens, img.shape[1])
    img_lens = _image_lens(img_lens, img.device)
    n_img, R, d = img.shape
    n_cap, device = cap.shape[0], img.device
    d_img = torch.empty((n_img, R, d), dtype=torch.float32, device=device)
    d_cap_packed = torch.zeros((caps.total_words, d), dtype=torch.float32, device=device)
    chunk = backward_image_chunk(n_img, R, caps.total_words, n_cap, options)

    def buffers(shape, wanted):
        if not wanted:
            return None, None
        return (torch.empty(shape, dtype=torch.float32, device=device),
                torch.empty(shape, dtype=torch.int32, device=device))

    t2i_coef, t2i_arg = buffers((chunk, caps.total_words), options.t2i)
    i2t_coef, i2t_arg = buffers((chunk * R, n_cap), options.i2t)
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    for i0 in range(0, n_img, chunk):
        img_chunk = img[i0:i0 + chunk]
        problem = native_problem(img_chunk, img_lens[i0:i0 + chunk], caps, options)
        native().maxsim_backward_cuda(problem, grad_sims[i0:i0 + chunk].data_ptr(), ptr(t2i_coef),
                                      ptr(t2i_arg), ptr(i2t_coef), ptr(i2t_arg),
                                      d_img[i0:i0 + chunk].data_ptr(), d_cap_packed.data_ptr(),
                                      _stream(device))
    real = torch.arange(cap.shape[1], device=device)[None, :] < caps.lens[:, None]
    d_cap = torch.zeros(cap.shape, dtype=torch.float32, device=device)
    d_cap[real] = d_cap_packed  # packed order = row-major order of the real words
    return d_img.to(img.dtype), d_cap.to(cap.dtype)


def maxsim_vsa_backward(grad_sims, img, cap, lens, img_lens, options: Options):
    """(d img, d cap) of the VSA coding in the input dtype; zero at padded regions and words.
    The kernel's per-pair buffers (SCAN i2t's layout) go through scan_cuda's GradientAccumulator
    image chunk by image chunk; padded regions are zeroed first (they meet zero rows there)."""
    grad_sims = grad_sims.to(torch.float32).contiguous()
    img_lens = _image_lens(img_lens, img.device)
    img = _rows_contiguous(zero_padding(img, img_lens))
    caps = prepare_captions(cap, lens, img.shape[1], vsa=True)
    n_img, R, d = img.shape
    acc = GradientAccumulator(caps.cap, caps.lens_host, options, torch.float32)
    d_img = torch.empty((n_img, R, d), dtype=torch.float32, device=img.device)
    chunk = scan_backward_image_chunk(n_img, R, caps.total_words, cap.shape[0], caps.max_len, True)
    no_query_norm = torch.zeros((chunk * R, 1), dtype=torch.float32, device=img.device)
    for i0 in range(0, n_img, chunk):
        img_chunk = img[i0:i0 + chunk]
        rows = img_chunk.shape[0] * R
        bufs = [torch.empty((rows, caps.total_words), dtype=torch.float32, device=img.device)
                for _ in range(3)]
        native().maxsim_vsa_backward_cuda(native_problem(img_chunk, img_lens[i0:i0 + chunk], caps, options),
                                          grad_sims[i0:i0 + chunk].data_ptr(),
                                          *(b.data_ptr() for b in bufs), _stream(img.device))
        d_img[i0:i0 + chunk] = acc.add_chunk(img_chunk, PairGrads(*bufs, no_query_norm[:rows]))
    return d_img.to(img.dtype), acc.caption_grad().to(cap.dtype)


def _forward(img, cap, lens, img_lens, options):
    return maxsim_forward(img, cap, lens, img_lens, Options(*options))


def _backward(grad, img, cap, lens, img_lens, options):
    return maxsim_backward(grad, img, cap, lens, img_lens, Options(*options))


# rcar_fast::maxsim_cuda and rcar_fast::maxsim_cuda_backward
maxsim_cuda_op = define_maxsim_op("maxsim_cuda", _forward, _backward)


def _vsa_options(pool: str, tau: float, vsa_tau: float) -> Options:
    return Options("i2t", pool, tau, False, 1.0, "vsa", vsa_tau)


@torch.library.custom_op("rcar_fast::maxsim_vsa_cuda", mutates_args=())
def maxsim_vsa_cuda_op(img: torch.Tensor, cap: torch.Tensor, lens: torch.Tensor, img_lens: torch.Tensor,
                       pool: str, tau: float, vsa_tau: float) -> torch.Tensor:
    """CHAN's VSA coding (i2t), all pairs: (n_img, n_cap) float32."""
    return maxsim_forward(img, cap, lens, img_lens, _vsa_options(pool, tau, vsa_tau))


@torch.library.custom_op("rcar_fast::maxsim_vsa_cuda_backward", mutates_args=())
def maxsim_vsa_cuda_backward_op(grad: torch.Tensor, img: torch.Tensor, cap: torch.Tensor, lens: torch.Tensor,
                                img_lens: torch.Tensor, pool: str, tau: float,
                                vsa_tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    return maxsim_vsa_backward(grad, img, cap, lens, img_lens, _vsa_options(pool, tau, vsa_tau))


@maxsim_vsa_cuda_op.register_fake
def _(img, cap, lens, img_lens, pool, tau, vsa_tau):
    return img.new_empty((img.shape[0], cap.shape[0]), dtype=torch.float32)


@maxsim_vsa_cuda_backward_op.register_fake
def _(grad, img, cap, lens, img_lens, pool, tau, vsa_tau):
    return torch.empty_like(img), torch.empty_like(cap)


def _vsa_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _vsa_backward_formula(ctx, grad):
    need_img, need_cap = ctx.needs_input_grad[:2]
    if not (need_img or need_cap):
        return (None,) * 7
    d_img, d_cap = maxsim_vsa_cuda_backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (d_img if need_img else None, d_cap if need_cap else None) + (None,) * 5


maxsim_vsa_cuda_op.register_autograd(_vsa_backward_formula, setup_context=_vsa_setup_context)


class MaxSimCuda(CudaTileBackend):
    op, kernel = "maxsim", "the CUDA maxsim kernels"
    codings = contract.HEAD_CODINGS

    @classmethod
    def tile_reason(cls, inputs: Inputs, regions: int, longest: int) -> Optional[str]:
        # This op's tile shapes first; the launch check (maxsim_problem_error, the kernels'
        # own limits) judges the rest.
        reason = tile_shape_rejection(regions, longest)
        if reason is None:
            reason = native().maxsim_problem_error(shape_problem(inputs, longest))
            reason = reason and f"the CUDA maxsim kernels: {reason}"
        return reason

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction="t2i", pool="mean", tau=contract.CHAN_TAU,
           leaky=False, both_scale=0.5, coding="max", vsa_tau=contract.CHAN_TAU) -> torch.Tensor:
        """Inputs already validated by rcar_fast.max_similarity (normalised, lens and img_lens
        int64 on the device). Returns (n_img, n_cap) float32."""
        if coding == "vsa":
            return maxsim_vsa_cuda_op(img, cap, lens, img_lens, pool, float(tau), float(vsa_tau))
        options = dict(direction=direction, pool=pool, tau=float(tau), leaky=bool(leaky),
                       both_scale=float(both_scale))
        return maxsim_cuda_op(img, cap, lens, img_lens, *(options[n] for n in MAXSIM_OPTION_NAMES))


# ---------------------------------------------------------------------------------------------
# Pair lists on the all-pairs kernel
# ---------------------------------------------------------------------------------------------

# Pairs per block of pairs_through_all_pairs: a block's matrix holds at most this squared
# entries, so at most PAIRS_PER_BLOCK times the listed pairs are scored.
PAIRS_PER_BLOCK = 512


def pairs_through_all_pairs(all_pairs, img, cap, lens, img_lens, img_idx, cap_idx, kw,
                            pairs_per_block: int = PAIRS_PER_BLOCK) -> torch.Tensor:
    """The listed pairs (P,) scored by an all-pairs function: the pairs, sorted by (image,
    caption), go in blocks; each block's distinct images and captions are gathered and scored
    as one small all-pairs matrix, and its listed entries are picked out. The values are the
    all-pairs kernel's own (same tile, same epilogue); gradients flow through the gathers and
    the all-pairs op (distinct rows per block: no two updates of one row inside a block).

    There is no CUDA pair kernel: this serves the sparse loss (<= 3B pairs of a B x B batch,
    whose block matrix is at most B x B) and re-ranking; the work is at most pairs_per_block
    times the listed pairs."""
    n_pairs = img_idx.numel()
    out = torch.empty(n_pairs, dtype=torch.float32 if img.dtype != torch.float64 else torch.float64,
                      device=img.device)
    if n_pairs == 0:
        return out
    order = torch.argsort(img_idx * cap.shape[0] + cap_idx, stable=True)
    pieces = []
    for start in range(0, n_pairs, pairs_per_block):
        chosen = order[start:start + pairs_per_block]
        images, img_at = torch.unique(img_idx[chosen], return_inverse=True)
        captions, cap_at = torch.unique(cap_idx[chosen], return_inverse=True)
        block_lens = lens.index_select(0, captions)
        words = int(block_lens.max())
        block = all_pairs(img.index_select(0, images), cap.index_select(0, captions)[:, :words].contiguous(),
                          block_lens, img_lens.index_select(0, images), **kw)
        pieces.append((chosen, block[img_at, cap_at]))
    if not any(values.requires_grad for _, values in pieces):
        for chosen, values in pieces:
            out[chosen] = values.to(out.dtype)
        return out
    # Differentiable: put the blocks back in the list's order without in-place writes.
    chosen = torch.cat([c for c, _ in pieces])
    values = torch.cat([v for _, v in pieces]).to(out.dtype)
    return values.index_select(0, torch.argsort(chosen))


class MaxSimPairsCuda(MaxSimCuda):
    op, backend, kernel = "maxsim_pairs", "cuda", "the CUDA maxsim kernels (pair lists in blocks)"

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction="t2i", pool="mean",
           tau=contract.CHAN_TAU, leaky=False, both_scale=0.5, coding="max",
           vsa_tau=contract.CHAN_TAU) -> torch.Tensor:
        kw = dict(direction=direction, pool=pool, tau=tau, leaky=leaky, both_scale=both_scale)
        if coding != "max":
            kw.update(coding=coding, vsa_tau=vsa_tau)
        return pairs_through_all_pairs(MaxSimCuda.fn, img, cap, lens, img_lens, img_idx, cap_idx, kw)
