"""SCAN (op "scan": all pairs; op "scan_pairs": a pair list): the op's custom ops and their
autograd, its backends, the public wrapper scan_similarity and its Scorer.

Every "scan" backend is a class (below) whose `fn` has the signature

    fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda) -> (n_img, n_cap)

and every "scan_pairs" backend

    fn(img, cap, lens, img_idx, cap_idx, *, direction, raw_norm, smooth, agg, lse_lambda) -> (P,)

`lens` (and the pair indices) arrive validated (int64, on cap's device); the result is float32,
or float64 for float64 inputs, and differentiable w.r.t. img and cap. BACKENDS (at the end)
lists them per op; rcar_fast.dispatch.TABLE takes them from there.

    reference, reference_loop   the float64-faithful reference math (rcar_fast.reference_math)
    cpu                         the C++ CPU kernels (csrc/cpu/scan.cpp)
    triton                      the Triton kernels (kernels/scan.py)
    cuda                        the CUDA kernels (csrc/cuda/scan.cu, tables from csrc/cuda/gram.cu)
    scan_pairs                  the reference's pair drivers; the C++ all-pairs kernels per image

ScanScorer (at the end) is SCAN's entry in the head registry (rcar_fast.scorers): model="scan"
with these keywords in score_pairs, the losses, all_pairs, the CLI and the trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rcar_fast import contract, flops, reference_math, validate
from rcar_fast.ops.backend import (COL_FRAGS, REQUESTABLE, Backend, BackendUnavailable,  # noqa: F401
                                   CpuKernelBackend, CudaTileBackend, Inputs, TritonBackend,
                                   caption_groups, choose, cuda_stream, native, output_dtype,
                                   rows_contiguous, tile_col_frags, tile_shape_rejection)
from rcar_fast.ops.backend import CUDA_DTYPE_CODES as DTYPE_CODES
from rcar_fast.ops.library import (PAIR_INDICES_SCHEMA, define, grouped_by_image, input_grads,
                                   listed_pairs, pairs_output, scan_output, vjp)
from rcar_fast.ops.scorer import Scorer
from rcar_fast.reference_math import AGGREGATIONS, DIRECTIONS, RAW_NORMS

__all__ = ["scan_similarity", "ScanScorer", "DIRECTIONS", "RAW_NORMS", "AGGREGATIONS", "BACKENDS"]


# ---------------------------------------------------------------------------------------------
# The custom ops: rcar_fast::scan_<backend>, scan_pairs_<backend> (and _backward)
# ---------------------------------------------------------------------------------------------

SCAN_OPTIONS = "str direction, str raw_norm, float smooth, str agg, float lse_lambda"
SCAN_OPTION_NAMES = ("direction", "raw_norm", "smooth", "agg", "lse_lambda")

ScanForward = Callable[..., Tensor]      # (img, cap, lens, [img_idx, cap_idx,] options) -> scores
ScanBackward = Callable[..., tuple]      # (grad, img, cap, lens, [img_idx, cap_idx,] options) -> (d img, d cap)


def define_scan_op(name: str, forward: ScanForward, backward: Optional[ScanBackward] = None,
                   pairs: bool = False):
    """Registers rcar_fast::{name} (and rcar_fast::{name}_backward when a backward is given)
    and returns the forward op. options = the 5-tuple (direction, raw_norm, smooth, agg,
    lse_lambda). All pairs: op(img, cap, lens, *options) -> (n_img, n_cap); pairs=True:
    op(img, cap, lens, img_idx, cap_idx, *options) -> (P,)."""
    n_index = 2 if pairs else 0

    def run_forward(img, cap, lens, *rest):
        return forward(img, cap, lens, *rest[:n_index], tuple(rest[n_index:]))

    def run_backward(grad, img, cap, lens, *rest):
        return tuple(backward(grad, img, cap, lens, *rest[:n_index], tuple(rest[n_index:])))

    def fake(img, cap, lens, *rest):
        return pairs_output(img, rest[0]) if pairs else scan_output(img, cap)

    schema = f"Tensor img, Tensor cap, Tensor lens, {PAIR_INDICES_SCHEMA if pairs else ''}{SCAN_OPTIONS}"
    return define(name, schema, fake, run_forward, backward and run_backward, "(Tensor, Tensor)",
                  lambda img, cap, *rest: input_grads(img, cap), (0, 1))


def _compiled_or_eager(op: Callable, eager: Callable) -> Callable:
    """A fused backend's fn: the inputs already validated by scan_similarity (lens int64 on
    cap's device), the custom op `op` inside torch.compile, else eager(img, cap, lens, options)
    (an autograd Function that keeps its forward's tables for the backward). Returns (n_img,
    n_cap) float32 (float64 for float64 inputs where the backend takes them)."""
    def fn(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
           lse_lambda=6.0):
        options = (direction, raw_norm, float(smooth), agg, float(lse_lambda))
        if torch.compiler.is_compiling():
            return op(img, cap, lens, *options)
        return eager(img, cap, lens, options)
    return fn


# ---------------------------------------------------------------------------------------------
# reference, reference_loop: the reference math
# ---------------------------------------------------------------------------------------------

# Eager calls run the reference directly (autograd keeps its activations: the oracle's memory
# and speed, and double backward, as ever). Inside torch.compile the vectorised form runs as the
# custom op rcar_fast::scan_reference (its backward op recomputes the forward under autograd),
# since its lens-dependent Python branches cannot be traced into one graph.

def _vectorized(img, cap, lens, **kw) -> torch.Tensor:
    return reference_math.scan_similarity_vectorized(img, cap, lens, **kw).to(output_dtype(img.dtype))


def _reference_forward(img, cap, lens, options) -> torch.Tensor:
    return _vectorized(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options)))


def _reference_backward(grad, img, cap, lens, options) -> tuple:
    return tuple(vjp(lambda i, c: _reference_forward(i, c, lens, options), [img, cap], grad))


# rcar_fast::scan_reference and rcar_fast::scan_reference_backward
scan_reference_op = define_scan_op("scan_reference", _reference_forward, _reference_backward)


class ScanReference(Backend):
    op, backend, kernel = "scan", "reference", "the vectorised reference"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return scan_reference_op(img, cap, lens, *(kw[name] for name in SCAN_OPTION_NAMES))
        return _vectorized(img, cap, lens, **kw)


class ScanReferenceLoop(Backend):
    op, backend, kernel = "scan", "reference_loop", "the reference loop"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        return reference_math.scan_similarity_loop(img, cap, lens, **kw).to(output_dtype(img.dtype))


# ---------------------------------------------------------------------------------------------
# cpu: the C++ CPU kernels (csrc/cpu/scan.cpp), forward and backward
# ---------------------------------------------------------------------------------------------

# SCAN all-pairs similarity on the C++ CPU kernels (csrc/cpu/scan.cpp), forward and backward.
#
# The kernels use the Gram identity: per tile of (caption block x image block), one GEMM gives
# every word-region score, and the per-pair reductions (normalisation over the queries, softmax
# over the context, alpha . s, alpha^T G alpha, cosine, aggregation) run on that tile in
# vectorised C++ with OpenMP over tiles. The backward recomputes the tile scores and turns the
# per-pair score gradients into two more GEMMs per tile. Memory is O(threads x tile), plus the
# context Grams: t2i one (R x R) matrix per image, i2t one (L x L) per caption. The t2i Grams are
# bounded here: images go to the kernels in chunks whose Grams fit GRAM_CHUNK_BYTES, and an image
# whose own Gram exceeds GRAM_IMAGE_BYTES is refused (backend="auto" then uses the reference).

# Bytes of the per-image Grams one kernel call may hold (its backward holds as much again for
# their gradients), and the most one image's Gram may take.
GRAM_CHUNK_BYTES = 256 * 2**20
GRAM_IMAGE_BYTES = 64 * 2**20
_VECTOR_BYTES = 32  # the kernels pad Gram rows to whole 256-bit vectors


def _gram_bytes(R: int, element_size: int) -> int:
    per_vector = _VECTOR_BYTES // element_size
    return R * (-(-R // per_vector) * per_vector) * element_size


def _image_gram_bytes(img: torch.Tensor) -> int:
    return _gram_bytes(img.shape[1], img.element_size())


def shape_rejection(img_shape: tuple, dtype: torch.dtype, direction: str) -> Optional[str]:
    """Why the kernels will not take these images (None if they will): a t2i image's (R x R)
    Gram over GRAM_IMAGE_BYTES."""
    R, element_size = img_shape[1], dtype.itemsize
    if direction != "t2i" or _gram_bytes(R, element_size) <= GRAM_IMAGE_BYTES:
        return None
    return (f"SCAN t2i on the C++ CPU kernels keeps an (R x R) Gram matrix per image: R = {R} "
            f"needs {_gram_bytes(R, element_size) / 2**20:.0f} MiB per image, over the limit of "
            f"{GRAM_IMAGE_BYTES / 2**20:.0f} MiB (R <= {_largest_region_count(element_size)} for "
            f"{str(dtype).replace('torch.', '')}); use backend='reference' or fewer regions")


def _largest_region_count(element_size: int) -> int:
    per_vector = _VECTOR_BYTES // element_size
    R = int((GRAM_IMAGE_BYTES / element_size) ** 0.5)
    while R * (-(-R // per_vector) * per_vector) * element_size > GRAM_IMAGE_BYTES:
        R -= 1
    return R


def _images_per_call(img: torch.Tensor, direction: str) -> int:
    if direction != "t2i":
        return img.shape[0]
    return max(1, GRAM_CHUNK_BYTES // _image_gram_bytes(img))


def native_settings(direction, raw_norm, smooth, agg, lse_lambda):
    """The kernels' typed problem description (csrc/cpu/scan.cpp ScanSettings) from the names."""
    return native().ScanSettings(
        direction=contract.DIRECTION_CODES[direction], raw_norm=contract.RAW_NORM_CODES[raw_norm],
        agg=contract.AGG_CODES[agg], smooth=float(smooth), lse_lambda=float(lse_lambda))


def _forward_chunk(img, cap, lens, options) -> torch.Tensor:
    return native().scan_forward_cpu(img, cap, lens, native_settings(*options))


def _cpu_forward(img, cap, lens, options) -> torch.Tensor:
    """sims (n_img, n_cap); t2i images in chunks whose Grams fit GRAM_CHUNK_BYTES."""
    per_call = _images_per_call(img, options[0])
    if per_call >= img.shape[0]:
        return _forward_chunk(img, cap, lens, options)
    return torch.cat([_forward_chunk(img[i:i + per_call], cap, lens, options)
                      for i in range(0, img.shape[0], per_call)])


def _cpu_backward(grad, img, cap, lens, options) -> tuple:
    """(d img, d cap), zero at caption padding; the same image chunks as the forward."""
    per_call = _images_per_call(img, options[0])
    if per_call >= img.shape[0]:
        return tuple(native().scan_backward_cpu(grad, img, cap, lens, native_settings(*options)))
    d_img, d_cap = [], None
    for i in range(0, img.shape[0], per_call):
        d_img_i, d_cap_i = native().scan_backward_cpu(grad[i:i + per_call].contiguous(),
                                                      img[i:i + per_call], cap, lens, native_settings(*options))
        d_img.append(d_img_i)
        d_cap = d_cap_i if d_cap is None else d_cap + d_cap_i
    return torch.cat(d_img), d_cap


# rcar_fast::scan_cpu and rcar_fast::scan_cpu_backward
scan_cpu_op = define_scan_op("scan_cpu", _cpu_forward, _cpu_backward)


class ScanCpu(CpuKernelBackend):
    op = "scan"

    @classmethod
    def extra_reasons(cls, inputs):
        if inputs.img_shape is None:
            return []
        reason = shape_rejection(inputs.img_shape, inputs.dtype, inputs.direction)
        return [reason] if reason else []

    @staticmethod
    def fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda):
        return scan_cpu_op(img, cap, lens, direction, raw_norm, float(smooth), agg, float(lse_lambda))


# ---------------------------------------------------------------------------------------------
# triton: the Triton kernels (kernels/scan.py)
# ---------------------------------------------------------------------------------------------

# The kernels (rcar_fast.kernels.scan) compute the forward and, recomputing per tile, the
# gradients with respect to img and cap; nothing of size (pairs x words) is ever stored, so a
# training step on B images x B captions needs memory for the inputs, their gradients, the
# (B, B) similarities and the small per-owner Gram matrices only.
#
# Dtypes: fp32/fp16/bf16 on CUDA (output float32); under triton's CPU interpreter (tests)
# fp32/fp16, and float64 (output float64), which makes torch.autograd.gradcheck possible.

def _triton_kernels():
    # Imported on first use: importing triton (and compiling) only when this backend runs.
    from rcar_fast.kernels import scan as scan_kernels

    return scan_kernels


class ScanSimilarityTriton(torch.autograd.Function):
    """sims = SCAN(img, cap, lens); backward gives d img and d cap (zero at caption padding),
    none for lens and the options. Not twice differentiable."""

    @staticmethod
    def forward(ctx, img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda):
        kernels = _triton_kernels()
        problem = kernels.build_problem(img, cap, lens, direction=direction, raw_norm=raw_norm,
                                        smooth=smooth, agg=agg, lse_lambda=lse_lambda)
        sims = kernels.scan_forward(problem)
        # The problem holds img, cap and the small per-owner tables (Gram matrices, query
        # norms, length buckets) that the backward reuses instead of recomputing.
        ctx.problem = problem
        return sims

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dsims):
        need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dimg, dcap = _triton_kernels().scan_backward(ctx.problem, dsims, need_img, need_cap)
        return dimg, dcap, None, None, None, None, None, None




def _triton_forward(img, cap, lens, options):
    return _triton_kernels().scan_forward(_triton_kernels().build_problem(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options))))


def _triton_backward(grad, img, cap, lens, options):
    kernels = _triton_kernels()
    problem = kernels.build_problem(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options)))
    return tuple(kernels.scan_backward(problem, grad, True, True))


# rcar_fast::scan_triton and rcar_fast::scan_triton_backward: what torch.compile sees. Its
# backward op rebuilds the small per-owner tables that the eager Function keeps from its
# forward (so eager calls keep the Function).
scan_triton_op = define_scan_op("scan_triton", _triton_forward, _triton_backward)


class ScanTriton(TritonBackend):
    op, kernel = "scan", "the Triton SCAN kernels"
    fn = staticmethod(_compiled_or_eager(
        scan_triton_op, lambda img, cap, lens, options: ScanSimilarityTriton.apply(img, cap, lens, *options)))


# ---------------------------------------------------------------------------------------------
# cuda: the CUDA kernels (csrc/cuda/scan.cu)
# ---------------------------------------------------------------------------------------------

# Forward: one kernel scores every (image, caption) pair through the Gram identity; the small
# per-item tables it needs (region or caption Gram matrices, squared query norms) come from
# csrc/cuda/gram.cu.
#
# Backward: the same kernel tiles, recomputed, write per pair dL/dS (S: the raw region-word
# scores), the attention weights alpha and 2 dL/d|ctx|^2 alpha, and dL/d|q|; the contractions
# with the features are dense GEMMs done here with torch (cuBLAS), image chunk by image chunk so
# that those (rows x words) buffers stay below BACKWARD_BUFFER_BYTES. Nothing is accumulated with
# atomics, so gradients are deterministic. Grads are computed in float32 and returned in the
# input dtype; caption padding gets zero gradient.
#
# Dtypes: float32 (fp32 FMA scores), float16 and bfloat16 (tensor-core scores, fp32
# accumulation); output float32. Shape limits of the fused tile: R <= 160 with captions up to 128
# words, R <= 320 with up to 64 words, R <= 640 with up to 32 words.

# Upper bound for the three per-chunk (rows x words) float32 buffers of the backward.
BACKWARD_BUFFER_BYTES = 768 * 2**20


class Options(NamedTuple):
    direction: str
    raw_norm: str
    smooth: float
    agg: str
    lse_lambda: float

    @property
    def i2t(self) -> bool:
        return self.direction == "i2t"


def _native():
    return native()


@dataclasses.dataclass
class Captions:
    """Caption-side tables shared by the forward and every backward image chunk."""
    cap: torch.Tensor             # (n_cap, Lmax, d), rows contiguous
    lens: torch.Tensor            # (n_cap,) int64 on the device
    lens_host: list
    word_off: torch.Tensor        # (n_cap + 1,) int64: packed index of each caption's first word
    total_words: int
    max_len: int
    col_frags: int
    group_first: torch.Tensor     # (n_groups + 1,) int32
    gram: Optional[torch.Tensor]  # i2t: packed per-caption Gram matrices
    gram_off: Optional[torch.Tensor]
    word_sq: Optional[torch.Tensor]  # t2i: (total_words,) squared word norms


@dataclasses.dataclass
class Images:
    img: torch.Tensor             # (n_img, R, d), rows contiguous
    gram: Optional[torch.Tensor]  # t2i: (n_img, R, R) region Gram matrices
    region_sq: Optional[torch.Tensor]  # i2t: (n_img * R,) squared region norms


def caption_grams(cap, lens, lens_host: list) -> tuple:
    """(gram, gram_off): caption j's lens[j] x lens[j] word Gram (float32, row-major) at
    gram[gram_off[j]:], padding never read. cap rows contiguous, lens int64 on cap's device."""
    n_cap, Lmax, d = cap.shape
    gram_off = torch.zeros(n_cap + 1, dtype=torch.int64, device=cap.device)
    torch.cumsum(lens * lens, 0, out=gram_off[1:])
    gram = torch.empty(sum(n * n for n in lens_host), dtype=torch.float32, device=cap.device)
    _native().gram_ragged_cuda(cap.data_ptr(), lens.data_ptr(), gram_off.data_ptr(), gram.data_ptr(),
                               n_cap, Lmax, d, cap.stride(0), cap.stride(1), DTYPE_CODES[cap.dtype],
                               cuda_stream(cap.device))
    return gram, gram_off


def prepare_captions(cap, lens, R: int, options: Options) -> Captions:
    """Caption tables, and the tile shape / caption groups for images with R regions."""
    native, device = _native(), cap.device
    cap = rows_contiguous(cap)
    n_cap, Lmax, d = cap.shape
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    lens_host = [int(v) for v in lens.cpu().tolist()]
    word_off = torch.zeros(n_cap + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=word_off[1:])
    total_words, max_len = sum(lens_host), max(lens_host)
    col_frags = tile_col_frags(R, max_len)  # raises before any work when no tile fits
    group_first = torch.tensor(caption_groups(lens_host, native.scan_tile_cols(col_frags)),
                               dtype=torch.int32, device=device)
    stream, dtype = cuda_stream(device), DTYPE_CODES[cap.dtype]
    gram = gram_off = word_sq = None
    if options.i2t:
        gram, gram_off = caption_grams(cap, lens, lens_host)
    else:
        word_sq = torch.empty(total_words, dtype=torch.float32, device=device)
        native.row_sqnorms_cuda(cap.data_ptr(), lens.data_ptr(), word_off.data_ptr(), word_sq.data_ptr(),
                                n_cap, Lmax, d, cap.stride(0), cap.stride(1), dtype, stream)
    return Captions(cap=cap, lens=lens, lens_host=lens_host, word_off=word_off,
                    total_words=total_words, max_len=max_len, col_frags=col_frags,
                    group_first=group_first, gram=gram, gram_off=gram_off, word_sq=word_sq)


def prepare_images(img, options: Options) -> Images:
    native, device = _native(), img.device
    img = rows_contiguous(img)
    n_img, R, d = img.shape
    stream, dtype = cuda_stream(device), DTYPE_CODES[img.dtype]
    gram = region_sq = None
    if options.i2t:
        region_sq = torch.empty(n_img * R, dtype=torch.float32, device=device)
        native.row_sqnorms_cuda(img.data_ptr(), 0, 0, region_sq.data_ptr(), n_img, R, d,
                                img.stride(0), img.stride(1), dtype, stream)
    else:
        gram = torch.empty((n_img, R, R), dtype=torch.float32, device=device)
        native.gram_ragged_cuda(img.data_ptr(), 0, 0, gram.data_ptr(), n_img, R, d,
                                img.stride(0), img.stride(1), dtype, stream)
    return Images(img=img, gram=gram, region_sq=region_sq)


def native_problem(images: Images, caps: Captions, options: Options):
    """The typed problem description the launchers take (the binding's ScanProblemCuda)."""
    return _native().ScanProblemCuda(**problem(images, caps, options))


def problem(images: Images, caps: Captions, options: Options) -> dict:
    """The ScanProblem fields (csrc/cuda/scan.cu) as a dict of ints and floats."""
    img, cap = images.img, caps.cap
    n_img, R, d = img.shape
    gram = caps.gram if options.i2t else images.gram
    query_sq = images.region_sq if options.i2t else caps.word_sq
    return dict(
        img=img.data_ptr(), cap=cap.data_ptr(), dtype=DTYPE_CODES[img.dtype],
        n_img=n_img, R=R, d=d, n_cap=cap.shape[0],
        img_stride_n=img.stride(0), img_stride_r=img.stride(1),
        cap_stride_n=cap.stride(0), cap_stride_w=cap.stride(1),
        lens=caps.lens.data_ptr(), word_off=caps.word_off.data_ptr(),
        total_words=caps.total_words, max_len=caps.max_len,
        group_first=caps.group_first.data_ptr(), n_groups=caps.group_first.numel() - 1,
        col_frags=caps.col_frags, gram=gram.data_ptr(),
        gram_off=caps.gram_off.data_ptr() if options.i2t else 0,
        query_sq=query_sq.data_ptr(), i2t=int(options.i2t),
        raw_norm=contract.RAW_NORM_CODES[options.raw_norm], agg=contract.AGG_CODES[options.agg],
        smooth=float(options.smooth), lse_lambda=float(options.lse_lambda),
    )


def scan_forward(img, cap, lens, options: Options, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sims (n_img, n_cap) float32; `out`, when given, is written in place (tests poison it)."""
    caps = prepare_captions(cap, lens, img.shape[1], options)
    images = prepare_images(img, options)
    if out is None:
        out = torch.empty((img.shape[0], cap.shape[0]), dtype=torch.float32, device=img.device)
    _native().scan_forward_cuda(native_problem(images, caps, options), out.data_ptr(), cuda_stream(img.device))
    return out


# -----------------------------------------------------------------------------------------------
# Backward
# -----------------------------------------------------------------------------------------------

class PairGrads(NamedTuple):
    """Per-pair outputs of the backward kernel for one image chunk (see csrc/cuda/scan.cu). Rows are
    query items, columns context items: t2i (words, image rows), i2t (image rows, words)."""
    d_scores: torch.Tensor
    attn: torch.Tensor
    attn_scaled: torch.Tensor
    d_query_norm: torch.Tensor    # t2i (words, n_img_chunk); i2t (n_img_chunk * R, n_cap)


def pair_grads_cuda(images: Images, caps: Captions, grad_chunk: torch.Tensor,
                    options: Options) -> PairGrads:
    n_img, R, _ = images.img.shape
    rows, words = n_img * R, caps.total_words
    shape = (rows, words) if options.i2t else (words, rows)
    device = images.img.device
    bufs = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(3)]
    d_qn = torch.empty((rows, caps.cap.shape[0]) if options.i2t else (words, n_img),
                       dtype=torch.float32, device=device)
    _native().scan_backward_cuda(native_problem(images, caps, options), grad_chunk.data_ptr(),
                                 bufs[0].data_ptr(), bufs[1].data_ptr(), bufs[2].data_ptr(),
                                 d_qn.data_ptr(), cuda_stream(device))
    return PairGrads(*bufs, d_qn)


def _inverse_norms(sq: torch.Tensor) -> torch.Tensor:
    # d|x|/dx = x/|x|, and 0 at x = 0 (as torch.linalg.vector_norm's backward).
    norm = sq.clamp(min=0).sqrt()
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


class GradientAccumulator:
    """Turns per-chunk PairGrads into d img (per chunk) and d cap (summed over chunks) with dense
    GEMMs. Works in the dtype of the PairGrads buffers (float32 on the GPU; float64 in the CPU
    tests that feed it emulated buffers)."""

    def __init__(self, cap: torch.Tensor, lens_host: list, options: Options, dtype: torch.dtype):
        self.options, self.dtype = options, dtype
        n_cap, Lmax, d = cap.shape
        self.max_len = max(lens_host)
        lens_t = torch.tensor(lens_host, device=cap.device)
        self.mask = torch.arange(self.max_len, device=cap.device)[None, :] < lens_t[:, None]
        self.cap_shape = cap.shape
        self.cap_packed = cap[:, :self.max_len][self.mask].to(dtype)          # (W, d)
        self.d_cap_packed = torch.zeros_like(self.cap_packed)
        if options.i2t:
            # Padded column index of each packed word, for the per-caption Gram gradients.
            self.pad_index = self.mask.reshape(-1).nonzero().squeeze(1)
            self.d_cap_gram = torch.zeros((n_cap, self.max_len, self.max_len), dtype=dtype,
                                          device=cap.device)
        else:
            self.d_word_norm = torch.zeros(self.cap_packed.shape[0], dtype=dtype, device=cap.device)

    def _per_caption_gram_grad(self, attn_scaled, attn):
        """sum over rows of attn_scaled[:, cols_j]^T attn[:, cols_j] for every caption j."""
        rows = attn.shape[0]
        n_cap, Lm = self.mask.shape

        def padded(x):
            out = x.new_zeros((rows, n_cap * Lm))
            out[:, self.pad_index] = x
            return out.view(rows, n_cap, Lm)

        return torch.bmm(padded(attn_scaled).permute(1, 2, 0), padded(attn).permute(1, 0, 2))

    def add_chunk(self, img_chunk: torch.Tensor, grads: PairGrads) -> torch.Tensor:
        """Accumulates this chunk's share of d cap; returns d img for the chunk (n, R, d)."""
        n, R, d = img_chunk.shape
        img_flat = img_chunk.reshape(n * R, d).to(self.dtype)
        ds = grads.d_scores.to(self.dtype)
        if self.options.i2t:
            d_img = ds @ self.cap_packed
            self.d_cap_packed += ds.t() @ img_flat
            self.d_cap_gram += self._per_caption_gram_grad(grads.attn_scaled.to(self.dtype),
                                                          grads.attn.to(self.dtype))
            region_sq = img_flat.pow(2).sum(1)
            d_img += (grads.d_query_norm.to(self.dtype).sum(1) * _inverse_norms(region_sq))[:, None] * img_flat
            return d_img.view(n, R, d)
        d_img = ds.t() @ self.cap_packed
        self.d_cap_packed += ds @ img_flat
        words = ds.shape[0]
        scaled = grads.attn_scaled.to(self.dtype).view(words, n, R).permute(1, 2, 0)   # (n, R, W)
        attn = grads.attn.to(self.dtype).view(words, n, R).permute(1, 0, 2)             # (n, W, R)
        d_gram = torch.bmm(scaled, attn)                                                # (n, R, R)
        d_img = d_img.view(n, R, d) + torch.bmm(d_gram, img_flat.view(n, R, d))
        self.d_word_norm += grads.d_query_norm.to(self.dtype).sum(1)
        return d_img

    def caption_grad(self) -> torch.Tensor:
        """d cap (n_cap, Lmax, d), zero at padding."""
        d_packed = self.d_cap_packed
        if self.options.i2t:
            n_cap, Lm = self.mask.shape
            cap_padded = self.cap_packed.new_zeros((n_cap, Lm, self.cap_packed.shape[1]))
            cap_padded[self.mask] = self.cap_packed
            d_packed = d_packed + torch.bmm(self.d_cap_gram, cap_padded)[self.mask]
        else:
            word_sq = self.cap_packed.pow(2).sum(1)
            d_packed = d_packed + (self.d_word_norm * _inverse_norms(word_sq))[:, None] * self.cap_packed
        out = d_packed.new_zeros(self.cap_shape)
        out[:, :self.max_len][self.mask] = d_packed
        return out


def backward_image_chunk(n_img: int, R: int, total_words: int, n_cap: int, max_len: int,
                         i2t: bool, budget: int = None) -> int:
    """Images per backward chunk so that its float32 buffers stay below the budget."""
    budget = BACKWARD_BUFFER_BYTES if budget is None else budget
    per_image = 4 * R * (3 * total_words + n_cap)
    if i2t:
        per_image += 4 * R * 2 * n_cap * max_len  # the padded copies for the caption Gram grads
    return max(1, min(n_img, budget // max(per_image, 1)))


def scan_backward(img, cap, lens, grad_sims, options: Options):
    grad_sims = grad_sims.to(torch.float32).contiguous()
    caps = prepare_captions(cap, lens, img.shape[1], options)
    img = rows_contiguous(img)
    n_img, R, d = img.shape
    acc = GradientAccumulator(caps.cap, caps.lens_host, options, torch.float32)
    d_img = torch.empty((n_img, R, d), dtype=torch.float32, device=img.device)
    chunk = backward_image_chunk(n_img, R, caps.total_words, cap.shape[0], caps.max_len, options.i2t)
    for i0 in range(0, n_img, chunk):
        img_chunk = img[i0:i0 + chunk]
        images = prepare_images(img_chunk, options)
        grads = pair_grads_cuda(images, caps, grad_sims[i0:i0 + chunk], options)
        d_img[i0:i0 + chunk] = acc.add_chunk(images.img, grads)
    return d_img, acc.caption_grad()


class ScanSimilarityCuda(torch.autograd.Function):
    """sims = SCAN(img, cap, lens); backward gives d img and d cap (zero at caption padding),
    none for lens and the options. Not twice differentiable."""

    @staticmethod
    def forward(ctx, img, cap, lens, options: Options):
        ctx.save_for_backward(img, cap, lens)
        ctx.options = options
        return scan_forward(img, cap, lens, options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sims):
        img, cap, lens = ctx.saved_tensors
        need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_img or need_cap):
            return None, None, None, None
        d_img, d_cap = scan_backward(img, cap, lens, grad_sims, ctx.options)
        return (d_img.to(img.dtype) if need_img else None,
                d_cap.to(cap.dtype) if need_cap else None, None, None)


def _cuda_forward(img, cap, lens, options) -> torch.Tensor:
    return scan_forward(img, cap, lens, Options(*options))


def _cuda_backward(grad, img, cap, lens, options) -> tuple:
    d_img, d_cap = scan_backward(img, cap, lens, grad, Options(*options))
    return d_img.to(img.dtype), d_cap.to(cap.dtype)


# rcar_fast::scan_cuda and rcar_fast::scan_cuda_backward: what torch.compile sees (eager calls
# keep ScanSimilarityCuda; both run the same scan_forward / scan_backward).
scan_cuda_op = define_scan_op("scan_cuda", _cuda_forward, _cuda_backward)


class ScanCuda(CudaTileBackend):
    op, kernel = "scan", "the CUDA SCAN kernels"   # output float32
    fn = staticmethod(_compiled_or_eager(
        scan_cuda_op, lambda img, cap, lens, options: ScanSimilarityCuda.apply(img, cap, lens, Options(*options))))


# ---------------------------------------------------------------------------------------------
# scan_pairs: the reference's pair drivers on listed pairs; the C++ kernels per image
# ---------------------------------------------------------------------------------------------

def _scan_pairs_reference(driver: Callable) -> Callable:
    """The scan_pairs op on a reference pair driver (pairs_vectorized or pairs_loop)."""
    def scan_pairs(img, cap, lens, img_idx, cap_idx, *, direction, **kw):
        pair_fn = reference_math.scan_pair_fn(**kw)
        return listed_pairs(driver, img, cap, lens, img_idx, cap_idx, direction, pair_fn)
    return scan_pairs


# ---------------------------------------------------------------------------------------------
# The pair ops as custom ops (what torch.compile sees): the eager implementation as forward, its
# recomputation under autograd as backward (the pair drivers and the per-image grouping branch on
# the data, so torch.compile cannot trace them)
# ---------------------------------------------------------------------------------------------

def define_scan_pairs_op(name: str, scan_pairs: Callable):
    """rcar_fast::{name}(img, cap, lens, img_idx, cap_idx, *options) -> (P,) on an eager
    scan_pairs function (the signature of the scan_pairs op), and its backward op."""
    def forward(img, cap, lens, img_idx, cap_idx, options):
        return scan_pairs(img, cap, lens, img_idx, cap_idx, **dict(zip(SCAN_OPTION_NAMES, options)))

    def backward(grad, img, cap, lens, img_idx, cap_idx, options):
        return tuple(vjp(lambda i, c: forward(i, c, lens, img_idx, cap_idx, options), [img, cap], grad))

    return define_scan_op(name, forward, backward, pairs=True)


def _compiled_scan_pairs(op: Callable, eager: Callable) -> Callable:
    def scan_pairs(img, cap, lens, img_idx, cap_idx, **kw):
        if torch.compiler.is_compiling():
            return op(img, cap, lens, img_idx, cap_idx, *(kw[name] for name in SCAN_OPTION_NAMES))
        return eager(img, cap, lens, img_idx, cap_idx, **kw)
    return scan_pairs


def _scan_pairs_cpu(img, cap, lens, img_idx, cap_idx, **kw):
    return grouped_by_image(lambda i, c, n: ScanCpu.fn(i, c, n, **kw), img, cap, lens, img_idx, cap_idx)


_scan_pairs_vectorized = _scan_pairs_reference(reference_math.pairs_vectorized)
# rcar_fast::scan_pairs_reference, rcar_fast::scan_pairs_cpu (and their _backward)
scan_pairs_reference_op = define_scan_pairs_op("scan_pairs_reference", _scan_pairs_vectorized)
scan_pairs_cpu_op = define_scan_pairs_op("scan_pairs_cpu", _scan_pairs_cpu)


class ScanPairsReference(Backend):
    op, backend, kernel = "scan_pairs", "reference", "the vectorised reference"
    fn = staticmethod(_compiled_scan_pairs(scan_pairs_reference_op, _scan_pairs_vectorized))


class ScanPairsReferenceLoop(Backend):
    op, backend, kernel = "scan_pairs", "reference_loop", "the reference loop"
    fn = staticmethod(_scan_pairs_reference(reference_math.pairs_loop))


class ScanPairsCpu(Backend):
    """The C++ CPU all-pairs kernels per distinct image: it takes what ScanCpu takes. Only the
    CPU kernels for now: a call per image costs microseconds there. On a GPU the per-image
    launches (and Triton's autotuning per distinct caption count) need measuring first, and
    the vectorised reference's <= 3B pairs are cheap next to the B x B selection pass."""
    op, backend, kernel = "scan_pairs", "cpu", ScanCpu.kernel

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list:
        return ScanCpu.not_supported_reasons(inputs)

    @classmethod
    def capabilities(cls) -> dict:
        return ScanCpu.capabilities()

    fn = staticmethod(_compiled_scan_pairs(scan_pairs_cpu_op, _scan_pairs_cpu))


# ---------------------------------------------------------------------------------------------
# The backends of the ops (rcar_fast.dispatch.TABLE takes them from here)
# ---------------------------------------------------------------------------------------------

BACKENDS = {
    "scan": (ScanReference, ScanReferenceLoop, ScanTriton, ScanCuda, ScanCpu),
    "scan_pairs": (ScanPairsReference, ScanPairsReferenceLoop, ScanPairsCpu),
}


# ---------------------------------------------------------------------------------------------
# The public wrapper and the head registry's entry
# ---------------------------------------------------------------------------------------------

def scan_similarity(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm", smooth=9.0,
                    agg="mean", lse_lambda=6.0, backend="auto") -> torch.Tensor:
    """SCAN similarity of every (image, caption) pair.

    img (n_img, R, d), cap (n_cap, Lmax, d) with word positions >= lens[j] ignored, lens (n_cap,)
    integers in [1, Lmax]. Returns (n_img, n_cap) float32 (float64 for float64 inputs).
    direction "t2i" attends words to regions, "i2t" regions to words; see SIMILARITY.md.
    smooth (the attention's softmax temperature): positive, at most 1e3 for float32 / float16 /
    bfloat16 inputs and 1e6 for float64 ones (validate.SMOOTH_LIMITS: beyond them the result
    depends on rounding); lse_lambda: any finite value >= 1e-30. Numbers may be Python or NumPy
    scalars or 0-d tensors.
    """
    validate.choice(direction, "direction", DIRECTIONS)
    validate.choice(raw_norm, "raw_norm", RAW_NORMS)
    validate.choice(agg, "agg", AGGREGATIONS)
    validate.positive_number(smooth, "smooth")
    lse_lambda = validate.lse_lambda_value(lse_lambda)
    validate.choice(backend, "backend", REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    smooth = validate.smooth_for(smooth, img.dtype)
    impl = choose("scan", BACKENDS["scan"], backend, Inputs.of_scan(img, cap, direction, lens))
    return impl.fn(img, cap, lens, direction=direction, raw_norm=raw_norm, smooth=smooth,
                   agg=agg, lse_lambda=lse_lambda)


class ScanScorer(Scorer):
    """SCAN as a head of the registry: a keyword head (no weights), the ops "scan" and
    "scan_pairs", the keywords of scan_similarity."""
    name, title = "scan", "SCAN"
    all_pairs_op, pairs_op = "scan", "scan_pairs"
    backends = BACKENDS
    defaults = dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
                    lse_lambda=6.0)

    @classmethod
    def validate(cls, kwargs: dict, dtype: torch.dtype) -> dict:
        validate.choice(kwargs["direction"], "direction", DIRECTIONS)
        validate.choice(kwargs["raw_norm"], "raw_norm", RAW_NORMS)
        validate.choice(kwargs["agg"], "agg", AGGREGATIONS)
        kwargs["smooth"] = validate.smooth_for(kwargs["smooth"], dtype)
        kwargs["lse_lambda"] = validate.lse_lambda_value(kwargs["lse_lambda"])
        return kwargs

    @classmethod
    def inputs(cls, model, settings, img, cap, lens) -> Inputs:
        return Inputs.of_scan(img, cap, settings["direction"], lens)

    @classmethod
    def call_all_pairs(cls, impl, model, settings, img, cap, lens):
        return impl.fn(img, cap, lens, **settings)

    @classmethod
    def call_pairs(cls, impl, model, settings, img, cap, lens, img_idx, cap_idx):
        return impl.fn(img, cap, lens, img_idx, cap_idx, **settings)

    @classmethod
    def forward_flops(cls, model, settings, n_img, lens, regions, d) -> float:
        return flops.scan_forward(n_img, lens, regions, d, settings["direction"])

    @classmethod
    def pair_flops(cls, model, settings, pair_lens, regions, d) -> float:
        return flops.scan_pairs_forward(pair_lens, regions, d, settings["direction"])

    @classmethod
    def build(cls, name, embed_dim, options):
        """SCAN at the published smooth of its direction (t2i 9, i2t 4) unless given; the
        options named like SCAN's keywords are its settings."""
        settings = {k: v for k, v in options.items() if k in cls.defaults and v is not None}
        settings.setdefault("direction", cls.defaults["direction"])
        settings.setdefault("smooth", contract.SCAN_PUBLISHED["f30k"][settings["direction"]]["smooth"])
        return name, settings

    @classmethod
    def vectorized_reference(cls, model, settings):
        return lambda img, cap, lens: reference_math.scan_similarity_vectorized(img, cap, lens,
                                                                                **settings)
