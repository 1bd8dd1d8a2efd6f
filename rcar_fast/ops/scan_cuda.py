"""SCAN all-pairs similarity on the CUDA C++ kernels (csrc/cuda/scan.cu): autograd wiring and
dispatch registration.

Forward: one kernel scores every (image, caption) pair through the Gram identity; the small
per-item tables it needs (region or caption Gram matrices, squared query norms) come from
csrc/cuda/gram.cu.

Backward: the same kernel tiles, recomputed, write per pair dL/dS (S: the raw region-word
scores), the attention weights alpha and 2 dL/d|ctx|^2 alpha, and dL/d|q|; the contractions
with the features are dense GEMMs done here with torch (cuBLAS), image chunk by image chunk so
that those (rows x words) buffers stay below BACKWARD_BUFFER_BYTES. Nothing is accumulated with
atomics, so gradients are deterministic. Grads are computed in float32 and returned in the
input dtype; caption padding gets zero gradient.

Dtypes: float32 (fp32 FMA scores), float16 and bfloat16 (tensor-core scores, fp32
accumulation); output float32. Shape limits of the fused tile: R <= 160 with captions up to 128
words, R <= 320 with up to 64 words, R <= 640 with up to 32 words.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from rcar_fast import contract
from rcar_fast.ops.backend import Backend, BackendUnavailable, Inputs, native
from rcar_fast.ops.library import define_scan_op

DTYPE_CODES = {getattr(torch, name): code for name, code in contract.CUDA_DTYPE_CODES.items()}
# Tile shapes of the kernel, widest caption groups first (see scan_tile_rows / scan_tile_cols).
COL_FRAGS = (8, 4, 2)
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


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _feature_rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index rows with arbitrary strides but read each feature vector contiguously.
    return x if x.stride(2) == 1 else x.contiguous()


def tile_shape_rejection(R: int, max_len: int, tile_rows=None, tile_cols=None) -> Optional[str]:
    """Why no tile shape holds R regions and a caption of max_len words (None if one does)."""
    tile_rows = tile_rows or _native().scan_tile_rows
    tile_cols = tile_cols or _native().scan_tile_cols
    if any(R <= tile_rows(c) and max_len <= tile_cols(c) for c in COL_FRAGS):
        return None
    limits = ", ".join(f"R <= {tile_rows(c)} with captions <= {tile_cols(c)} words" for c in COL_FRAGS)
    return (f"the CUDA SCAN kernel's tile cannot hold R={R} regions with a caption of {max_len} words "
            f"(supported: {limits}); use backend='triton' or 'reference'")


def tile_col_frags(R: int, max_len: int, tile_rows=None, tile_cols=None) -> int:
    """The tile shape (col_frags) whose rows hold R regions and whose columns hold the longest
    caption; raises BackendUnavailable when no tile shape fits."""
    tile_rows = tile_rows or _native().scan_tile_rows
    tile_cols = tile_cols or _native().scan_tile_cols
    for col_frags in COL_FRAGS:
        if R <= tile_rows(col_frags) and max_len <= tile_cols(col_frags):
            return col_frags
    raise BackendUnavailable(tile_shape_rejection(R, max_len, tile_rows, tile_cols))


def caption_groups(lens: list[int], capacity: int) -> list[int]:
    """Greedy cut of consecutive captions into groups of at most `capacity` words:
    the first caption of each group, then len(lens)."""
    first, used = [0], 0
    for j, n_words in enumerate(lens):
        if used + n_words > capacity:
            first.append(j)
            used = 0
        used += n_words
    first.append(len(lens))
    return first


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
                               _stream(cap.device))
    return gram, gram_off


def prepare_captions(cap, lens, R: int, options: Options) -> Captions:
    """Caption tables, and the tile shape / caption groups for images with R regions."""
    native, device = _native(), cap.device
    cap = _feature_rows_contiguous(cap)
    n_cap, Lmax, d = cap.shape
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    lens_host = [int(v) for v in lens.cpu().tolist()]
    word_off = torch.zeros(n_cap + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=word_off[1:])
    total_words, max_len = sum(lens_host), max(lens_host)
    col_frags = tile_col_frags(R, max_len)  # raises before any work when no tile fits
    group_first = torch.tensor(caption_groups(lens_host, native.scan_tile_cols(col_frags)),
                               dtype=torch.int32, device=device)
    stream, dtype = _stream(device), DTYPE_CODES[cap.dtype]
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
    img = _feature_rows_contiguous(img)
    n_img, R, d = img.shape
    stream, dtype = _stream(device), DTYPE_CODES[img.dtype]
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
    """The ScanProblem fields (csrc/cuda/kernels.h) as a dict of ints and floats."""
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
    _native().scan_forward_cuda(native_problem(images, caps, options), out.data_ptr(), _stream(img.device))
    return out


# -----------------------------------------------------------------------------------------------
# Backward
# -----------------------------------------------------------------------------------------------

class PairGrads(NamedTuple):
    """Per-pair outputs of the backward kernel for one image chunk (see kernels.h). Rows are
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
                                 d_qn.data_ptr(), _stream(device))
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
    img = _feature_rows_contiguous(img)
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


def _op_forward(img, cap, lens, options) -> torch.Tensor:
    return scan_forward(img, cap, lens, Options(*options))


def _op_backward(grad, img, cap, lens, options) -> tuple:
    d_img, d_cap = scan_backward(img, cap, lens, grad, Options(*options))
    return d_img.to(img.dtype), d_cap.to(cap.dtype)


# rcar_fast::scan_cuda and rcar_fast::scan_cuda_backward: what torch.compile sees (eager calls
# keep ScanSimilarityCuda; both run the same scan_forward / scan_backward).
scan_cuda_op = define_scan_op("scan_cuda", _op_forward, _op_backward)


class CudaTileBackend(Backend):
    """What the CUDA SCAN and maxsim backends share: their dtypes, and a tile that must hold R
    regions and the longest caption (when the wrapper did not read the lengths, the padded
    length Lmax bounds it), judged by `tile_reason`."""
    backend = "cuda"
    dtypes = {"cuda": tuple(DTYPE_CODES)}

    @classmethod
    def tile_reason(cls, inputs: Inputs, regions: int, longest: int) -> Optional[str]:
        return tile_shape_rejection(regions, longest)

    @classmethod
    def extra_reasons(cls, inputs: Inputs) -> list:
        extent = inputs.tile_extent()
        reason = extent and cls.tile_reason(inputs, *extent)
        return [reason] if reason else []


class ScanCuda(CudaTileBackend):
    op, kernel = "scan", "the CUDA SCAN kernels"

    @staticmethod
    def fn(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm", smooth=9.0,
           agg="mean", lse_lambda=6.0):
        """Inputs already validated by rcar_fast.scan_similarity (lens int64 on cap's device).
        Returns (n_img, n_cap) float32."""
        options = Options(direction, raw_norm, float(smooth), agg, float(lse_lambda))
        if torch.compiler.is_compiling():
            return scan_cuda_op(img, cap, lens, *options)
        return ScanSimilarityCuda.apply(img, cap, lens, options)
