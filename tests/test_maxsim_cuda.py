"""The S-only heads on the CUDA backend (csrc/cuda/maxsim.cu, rcar_fast/ops/maxsim.py).

Without a GPU this file checks what the host side decides: the extension carries the maxsim
launchers when built with CUDA, the launch check (maxsim_problem_error) refuses shapes beyond
the tile and bad codes with one clear message before anything launches, the dispatcher's
reasons, the backward's chunking. The GPU tests run the kernels against the float64 reference
(tests/maxsim_cases.py): every direction x pool x leaky x normalize, fp32 / fp16 / bf16 by the
2x rule, ragged on both sides with NaN padding, ties, L = 1, R = 1, all-negative scores,
poisoned outputs, gradients (zero in the padding, deterministic), every tile shape.

CHAN's VSA coding (coding="vsa") runs on the same tile kernel: its algorithm (per region the
softmax exponentials, the code through the caption's word Gram, the pool, then the per-pair
buffers dL/dS, a, 2 dL/d|c|^2 a of the backward kernel and their contraction) is transcribed in
float64 below and checked on the CPU against the reference and autograd; the GPU tests run the
kernel itself.
"""

import os

import pytest
import torch

import rcar_fast
from rcar_fast import contract, dispatch, reference_heads
from rcar_fast.ops import maxsim as maxsim_ops
from rcar_fast.ops import scan as scan_ops
from rcar_fast.ops.backend import BackendUnavailable, Inputs
from rcar_fast.ops.scan import GradientAccumulator, PairGrads
from rcar_fast.reference_heads import max_similarity_reference
from tests.conftest import native_or_skip, requires_cuda_build, requires_gpu
from tests.test_cuda_compiles import ROOT, assert_no_spills, kernel_stats, needs_nvcc
from tests.maxsim_cases import (CASES, all_negative_case, assert_head_matches_reference, poisoned_allocations,
                                ragged_case, reference_scores, settings_grid, settings_id, single_region_case,
                                single_word_case, tie_case)
from tests.tolerances import F64_BACKEND_AGREE, F64_PAIR_BACKWARD, F64_PAIRS, assert_bit_equal, assert_close, assert_close_to_reference

LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# nvcc: every maxsim kernel compiles for sm_80 and sm_90a without spills
# ----------------------------------------------------------------------------------------------

MAXSIM_SOURCE = os.path.join(ROOT, "csrc", "cuda", "maxsim.cu")
# (kernel, template arguments as ptxas's mangled names spell them) per architecture: the tile
# kernel (forward / backward, the VSA coding's included) and the contraction kernel (images /
# captions), for each input dtype.
MAXSIM_KERNELS = [(kernel, f"I{dtype}Lb{flag}E") for kernel in ("maxsim_tile_kernel", "maxsim_grad_kernel")
                  for dtype in ("f", "6__half", "13__nv_bfloat16") for flag in (0, 1)]


@pytest.mark.slow
@needs_nvcc
def test_maxsim_kernels_compile_without_spills(cuda_compiled):
    # the session's one compile of every .cu (conftest.cuda_compiled), with ptxas's stats
    rc, log, _ = cuda_compiled[os.path.basename(MAXSIM_SOURCE)]
    assert rc == 0, log[-3000:]
    stats = kernel_stats(log)
    for arch in ("sm_80", "sm_90a"):
        names = [name for name, a, *_ in stats if a == arch]
        for kernel, args in MAXSIM_KERNELS:
            assert sum(kernel in n and args in n for n in names) == 1, f"{kernel}{args} ({arch}) not in ptxas's stats"
    assert_no_spills(stats, "csrc/cuda/maxsim.cu")
    # the registers, for the record (pytest -s / -rP shows them)
    print("\n".join(f"{name} {arch}: {regs} registers" for name, arch, regs, *_ in stats))


def _problem(native, **changes):
    """A MaxSimProblemCuda the launch check takes (null pointers: it is never launched here)."""
    fields = dict(img=0, cap=0, dtype=contract.CUDA_DTYPE_CODES["float32"], n_img=2, R=36, d=64, n_cap=3,
                  img_stride_n=36 * 64, img_stride_r=64, cap_stride_n=12 * 64, cap_stride_w=64,
                  img_lens=0, lens=0, word_off=0, total_words=20, max_len=12, group_first=0, n_groups=1,
                  col_frags=8, direction=contract.HEAD_DIRECTION_CODES["t2i"],
                  pool=contract.POOL_CODES["mean"], leaky=0, tau=0.1, both_scale=0.5, vsa=0, vsa_tau=0.1,
                  gram=0, gram_off=0)
    fields.update(changes)
    return native.MaxSimProblemCuda(**fields)


# ----------------------------------------------------------------------------------------------
# Runs anywhere
# ----------------------------------------------------------------------------------------------

@requires_cuda_build
def test_extension_carries_the_maxsim_launchers():
    native = native_or_skip(with_cuda=True)
    for name in ("maxsim_forward_cuda", "maxsim_backward_cuda", "maxsim_vsa_backward_cuda", "maxsim_problem_error",
                 "MaxSimProblemCuda"):
        assert hasattr(native, name), f"rcar_fast._C has no {name}: rebuild the extension"


def test_launch_check_takes_the_tile_shapes_and_names_what_it_refuses():
    native = native_or_skip(with_cuda=True)
    for col_frags in maxsim_ops.COL_FRAGS:
        rows, cols = native.scan_tile_rows(col_frags), native.scan_tile_cols(col_frags)
        assert native.maxsim_problem_error(_problem(native, R=rows, max_len=cols, col_frags=col_frags)) is None
        assert "R (regions)" in native.maxsim_problem_error(
            _problem(native, R=rows + 1, max_len=cols, col_frags=col_frags))
        assert "longest caption" in native.maxsim_problem_error(
            _problem(native, R=rows, max_len=cols + 1, col_frags=col_frags))
    for changes, words in ((dict(pool=len(contract.POOLS)), "pool"),
                           (dict(direction=len(contract.HEAD_DIRECTIONS)), "direction"),
                           (dict(tau=0.0), "tau"), (dict(col_frags=3), "col_frags"), (dict(d=0), "d must"),
                           (dict(dtype=7), "dtype")):
        why = native.maxsim_problem_error(_problem(native, **changes))
        assert why is not None and words in why, (changes, why)
    assert native.maxsim_problem_error(_problem(native, n_img=0)) is None  # nothing to launch


def test_launch_check_takes_the_vsa_coding_on_i2t_alone():
    native = native_or_skip(with_cuda=True)
    i2t = contract.HEAD_DIRECTION_CODES["i2t"]
    assert native.maxsim_problem_error(_problem(native, vsa=1, direction=i2t)) is None
    for changes, words in ((dict(direction=contract.HEAD_DIRECTION_CODES["t2i"]), "i2t only"),
                           (dict(direction=contract.HEAD_DIRECTION_CODES["both"]), "i2t only"),
                           (dict(direction=i2t, leaky=1), "leaky 0"),
                           (dict(direction=i2t, vsa_tau=0.0), "vsa_tau")):
        why = native.maxsim_problem_error(_problem(native, vsa=1, **changes))
        assert why is not None and words in why, (changes, why)


def test_vsa_launchers_refuse_before_launching():
    # Null grams (or the coding's backward asked of the max-coding launcher) are refused by
    # the launchers themselves, before any launch: no GPU is needed to see it.
    native = native_or_skip(with_cuda=True)
    vsa = _problem(native, vsa=1, direction=contract.HEAD_DIRECTION_CODES["i2t"])
    with pytest.raises(RuntimeError, match="maxsim_forward_cuda failed"):
        native.maxsim_forward_cuda(vsa, 0, 0)
    with pytest.raises(RuntimeError, match="maxsim_backward_cuda failed"):
        native.maxsim_backward_cuda(vsa, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="maxsim_vsa_backward_cuda failed"):
        native.maxsim_vsa_backward_cuda(_problem(native), 0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"maxsim_vsa_backward_cuda: the VSA coding \(vsa\) runs direction i2t"):
        native.maxsim_vsa_backward_cuda(_problem(native, vsa=1), 0, 0, 0, 0, 0)


def test_launchers_refuse_a_bad_problem_before_launching():
    # The check runs first, so this needs no GPU: a launch would fault on the null pointers.
    native = native_or_skip(with_cuda=True)
    bad = _problem(native, R=native.scan_tile_rows(2) + 1, col_frags=2, max_len=4)
    with pytest.raises(RuntimeError, match=r"maxsim_forward_cuda: R \(regions\) is beyond"):
        native.maxsim_forward_cuda(bad, 0, 0)
    with pytest.raises(RuntimeError, match=r"maxsim_backward_cuda: R \(regions\) is beyond.*R=641"):
        native.maxsim_backward_cuda(bad, 0, 0, 0, 0, 0, 0, 0, 0)


def test_dispatch_lists_the_cuda_backend_and_refuses_shapes_beyond_the_tile():
    assert maxsim_ops.MaxSimCuda in dispatch.TABLE["maxsim"]
    assert dispatch.implementation("maxsim", "cuda") is maxsim_ops.MaxSimCuda
    on_cpu = dispatch.reasons("maxsim", "cuda", torch.device("cpu"), torch.float32)
    assert on_cpu and ("CUDA" in on_cpu[0] or "native" in on_cpu[0])
    native = dispatch.native_module()
    if isinstance(native, str):
        pytest.skip(native)
    too_wide = Inputs(torch.device("cuda"), torch.float16, (2, 641, 64), (3, 8, 64), "t2i")
    (reason,) = maxsim_ops.MaxSimCuda.extra_reasons(too_wide)
    assert "R=641" in reason and "maxsim" in reason
    too_long = Inputs(torch.device("cuda"), torch.float16, (2, 36, 64), (3, 129, 64), "t2i")
    assert "129 words" in maxsim_ops.MaxSimCuda.extra_reasons(too_long)[0]
    assert maxsim_ops.MaxSimCuda.extra_reasons(
        Inputs(torch.device("cuda"), torch.float16, (2, 36, 64), (3, 128, 64), "t2i")) == []
    # beyond the tile's shapes, the launch check's own limits (here the backward's grid) count too
    too_deep = Inputs(torch.device("cuda"), torch.float16, (2, 36, 65535 * 128 + 1), (3, 8, 65535 * 128 + 1), "both")
    (reason,) = maxsim_ops.MaxSimCuda.extra_reasons(too_deep)
    assert reason.startswith("the CUDA maxsim kernels: d is beyond"), reason


def test_tile_shape_choice_is_the_widest_that_fits():
    native_or_skip(with_cuda=True)
    assert maxsim_ops.tile_col_frags(36, 128) == 8
    assert maxsim_ops.tile_col_frags(161, 64) == 4
    assert maxsim_ops.tile_col_frags(400, 12) == 2
    with pytest.raises(BackendUnavailable, match="R=641"):
        maxsim_ops.tile_col_frags(641, 4)


def test_the_problem_built_from_tensors_passes_the_launch_check():
    # CPU tensors stand in for device ones: the problem is built (every field named and typed
    # as the binding wants) and checked, never launched.
    native = native_or_skip(with_cuda=True)
    case = ragged_case(3, 5, 7, 9, 16).to(torch.float16)
    options = maxsim_ops.Options("both", "lse", 0.5, True, 0.5)
    caps = maxsim_ops.prepare_captions(case.cap, case.lens, case.img.shape[1])
    assert caps.total_words == int(case.lens.sum()) and caps.max_len == int(case.lens.max())
    assert caps.word_off.tolist() == [0, *torch.cumsum(case.lens, 0).tolist()]
    problem = maxsim_ops.native_problem(case.img, case.img_lens, caps, options)
    assert native.maxsim_problem_error(problem) is None
    assert (problem.direction, problem.pool, problem.leaky, problem.col_frags) == (
        contract.HEAD_DIRECTION_CODES["both"], contract.POOL_CODES["lse"], 1, 8)
    assert problem.img_lens == case.img_lens.data_ptr() and problem.dtype == contract.CUDA_DTYPE_CODES["float16"]


def test_backward_chunk_keeps_the_coefficient_buffers_under_the_budget():
    both = maxsim_ops.Options("both", "mean", 0.1, False, 0.5)
    t2i = maxsim_ops.Options("t2i", "mean", 0.1, False, 0.5)
    # per image: 8 bytes per packed word (t2i) plus 8 per (region, caption) (i2t)
    assert maxsim_ops.backward_image_chunk(100, 36, 1000, 80, t2i, budget=8 * 1000 * 10) == 10
    assert maxsim_ops.backward_image_chunk(100, 36, 1000, 80, both, budget=8 * (1000 + 36 * 80) * 7) == 7
    assert maxsim_ops.backward_image_chunk(100, 36, 1000, 80, both, budget=1) == 1
    assert maxsim_ops.backward_image_chunk(5, 36, 1000, 80, t2i, budget=2**40) == 5


def _pool_weights(x, pool, tau):
    """dP/dx_k of the pools, as the kernel's pool_weight writes them (HEADS.md's table)."""
    if pool == "mean":
        return torch.full_like(x, 1.0 / x.numel())
    if pool == "sum":
        return torch.ones_like(x)
    if pool == "max":
        return torch.nn.functional.one_hot(torch.argmax(x), x.numel()).to(x)  # the first maximum
    p = torch.softmax(x / tau, 0)
    return p / tau if pool == "lse" else p * (1 + (x - (p * x).sum()) / tau)


def _coefficient_backward(case, settings, upstream):
    """The kernels' backward in float64 on the CPU: per pair the first argmax and the pooled
    maximum's coefficient (upstream x pool weight x leaky slope x both_scale), contracted with
    the winning rows, as maxsim_tile_kernel<.., true>, maxsim_image_grad_kernel and
    maxsim_caption_grad_kernel do."""
    img, cap = case.img, case.cap
    d_img, d_cap = torch.zeros_like(img), torch.zeros_like(cap)
    direction, pool, tau, leaky = (settings[k] for k in ("direction", "pool", "tau", "leaky"))
    scale = settings["both_scale"] if direction == "both" else 1.0
    for i in range(img.shape[0]):
        for j in range(cap.shape[0]):
            regions, words = img[i, :case.img_lens[i]], cap[j, :case.lens[j]]
            S = regions @ words.T
            for axis, wanted in ((0, direction != "i2t"), (1, direction != "t2i")):
                if not wanted:
                    continue
                best, arg = S.max(axis)  # t2i (axis 0): over regions for each word
                x = torch.where(best > 0, best, contract.LEAKY_SLOPE * best) if leaky else best
                ones = torch.ones_like(best)
                slope = torch.where(best > 0, ones, contract.LEAKY_SLOPE * ones) if leaky else ones
                coef = upstream[i, j] * scale * _pool_weights(x, pool, tau) * slope
                if axis == 0:
                    d_img[i].index_add_(0, arg, coef[:, None] * words)
                    d_cap[j, :case.lens[j]] += coef[:, None] * regions[arg]
                else:
                    d_img[i, :case.img_lens[i]] += coef[:, None] * words[arg]
                    d_cap[j].index_add_(0, arg, coef[:, None] * regions)
    return d_img, d_cap


@pytest.mark.parametrize("settings", settings_grid(normalize=("none",)), ids=settings_id)
def test_the_kernels_backward_formulas_match_autograd_float64(settings):
    # What the GPU kernels compute, emulated in float64 against autograd through the reference
    # (finite padding: the emulation never reads it, autograd multiplies it by 0).
    for case in (ragged_case(pad=0.0), tie_case(pad=0.0)):
        upstream = torch.randn(case.img.shape[0], case.cap.shape[0], dtype=torch.float64,
                               generator=torch.Generator().manual_seed(2))
        grad_case = case.requiring_grad()
        out = max_similarity_reference(grad_case.img, grad_case.cap, case.lens, case.img_lens, **settings)
        want = torch.autograd.grad(out, [grad_case.img, grad_case.cap], upstream)
        got = _coefficient_backward(case, settings, upstream)
        for what, g, w in zip(("d img", "d cap"), got, want):
            assert_close(g, w, F64_PAIR_BACKWARD, what=f"{case.name} {what}")


# The VSA coding's settings the transcription and the GPU tests run: every pool, two
# temperatures for the words' softmax.
VSA_SETTINGS = [dict(direction="i2t", coding="vsa", pool=pool, tau=0.5, vsa_tau=vsa_tau)
                for pool in contract.POOLS for vsa_tau in (0.1, 0.5)]


def _vsa_id(settings):
    return f"{settings['pool']}-vsa_tau{settings['vsa_tau']}"


def _vsa_code(S, G, inv_tau):
    """vsa_code of maxsim.cu: the exponentials e (max-shifted), x = (sum e S / z) / (|c| + eps)
    with |c| = sqrt(e^T G e) / z; also what the backward reuses (mean, norm, z, e, G e)."""
    e = torch.exp((S - S.max()) * inv_tau)
    z = e.sum()
    mean = (e * S).sum() / z
    ge = G @ e
    norm = (e * ge).sum().clamp(min=0).sqrt() / z
    return mean / (norm + contract.EPS), mean, norm, z, e, ge


def _vsa_region_grads(S, code, h, inv_tau):
    """vsa_region_grads of maxsim.cu: (dL/dS, a, 2 dL/d|c|^2 a) of one region's row."""
    _, mean, norm, z, e, ge = code
    a, ga = e / z, ge / z
    inv_ne = 1.0 / (norm + contract.EPS)
    k = mean / norm * inv_ne * inv_ne if norm > 0 else torch.zeros_like(norm)
    slope = inv_ne + ((S - mean) * inv_ne - k * (ga - norm * norm)) * inv_tau
    return h * a * slope, a, -h * k * a


def _vsa_kernel(case, settings, upstream=None):
    """maxsim_tile_kernel with p.vsa in float64: per pair the codes of the real regions (the
    caption's Gram, as gram.cu writes it) pooled into sims; with upstream, also the backward
    kernel's per-pair buffers (n_img * R, total_words), NaN where the kernel would not write."""
    img, cap, lens, img_lens = case.img, case.cap, case.lens.tolist(), case.img_lens.tolist()
    n_img, R, _ = img.shape
    word_off = [0, *torch.cumsum(case.lens, 0).tolist()]
    inv_tau = 1.0 / settings["vsa_tau"]
    sims = torch.full((n_img, cap.shape[0]), float("nan"), dtype=torch.float64)
    bufs = [torch.full((n_img * R, word_off[-1]), float("nan"), dtype=torch.float64) for _ in range(3)]
    for i in range(n_img):
        for j in range(cap.shape[0]):
            words = cap[j, :lens[j]]
            S, G = img[i, :img_lens[i]] @ words.T, words @ words.T
            codes = [_vsa_code(S[r], G, inv_tau) for r in range(img_lens[i])]
            x = torch.stack([c[0] for c in codes])
            sims[i, j] = reference_heads.pool_values(x, settings["pool"], settings["tau"])
            if upstream is None:
                continue
            weights = _pool_weights(x, settings["pool"], settings["tau"])
            cols = slice(word_off[j], word_off[j + 1])
            for r in range(R):
                row = i * R + r
                grads = (_vsa_region_grads(S[r], codes[r], upstream[i, j] * weights[r], inv_tau)
                         if r < img_lens[i] else [torch.zeros(lens[j], dtype=torch.float64)] * 3)
                for buf, value in zip(bufs, grads):
                    buf[row, cols] = value
    return sims, bufs


def _vsa_contraction(case, bufs, chunk):
    """What ops/maxsim.py's maxsim_vsa_backward does with the kernel's buffers, in float64:
    image chunks through ops/scan.py's GradientAccumulator, padded regions zeroed first."""
    img = reference_heads.zero_padding(case.img, case.img_lens)
    n_img, R, _ = img.shape
    options = maxsim_ops.Options("i2t", "mean", 0.5, False, 1.0, "vsa", 0.1)
    acc = GradientAccumulator(case.cap, case.lens.tolist(), options, torch.float64)
    d_img = []
    for i0 in range(0, n_img, chunk):
        rows = slice(i0 * R, min(n_img, i0 + chunk) * R)
        grads = PairGrads(*(b[rows] for b in bufs), torch.zeros(rows.stop - rows.start, 1, dtype=torch.float64))
        d_img.append(acc.add_chunk(img[i0:i0 + chunk], grads))
    return torch.cat(d_img), acc.caption_grad()


@pytest.mark.parametrize("settings", VSA_SETTINGS, ids=_vsa_id)
def test_the_vsa_kernels_forward_matches_the_reference_float64(settings):
    for case in (ragged_case(seed=11), ragged_case(2, 3, 4, 1, 8, seed=12), all_negative_case(seed=13)):
        sims, _ = _vsa_kernel(case, settings)
        want = max_similarity_reference(case.img, case.cap, case.lens, case.img_lens, **settings)
        assert_close(sims, want, F64_PAIRS, what=f"{case.name} VSA sims")


@pytest.mark.parametrize("settings", VSA_SETTINGS, ids=_vsa_id)
def test_the_vsa_kernels_backward_matches_autograd_float64(settings):
    # The transcribed kernel buffers (every entry of every pair's block written, NaN padding of
    # the inputs never read), contracted as the CUDA backend does, in one chunk and in chunks
    # of one image, against autograd through the reference (finite padding for autograd).
    for case in (ragged_case(seed=14), tie_case(seed=15), single_region_case(seed=16)):
        upstream = torch.randn(case.img.shape[0], case.cap.shape[0], dtype=torch.float64,
                               generator=torch.Generator().manual_seed(4))
        _, bufs = _vsa_kernel(case, settings, upstream)
        for buf in bufs:
            assert bool(torch.isfinite(buf).all()), "an entry of the per-pair buffers is left unwritten"
        finite = case.with_padding(0.0).requiring_grad()
        out = max_similarity_reference(finite.img, finite.cap, case.lens, case.img_lens, **settings)
        want = torch.autograd.grad(out, [finite.img, finite.cap], upstream)
        for chunk in (case.img.shape[0], 1):
            got = _vsa_contraction(case, bufs, chunk)
            for what, g, w in zip(("d img", "d cap"), got, want):
                assert_close(g, w, F64_PAIR_BACKWARD, what=f"{case.name} {what} chunk {chunk}")
                assert not torch.isnan(g).any()


def test_vsa_transcription_sees_a_wrong_gram_term():
    # The check above can fail: dropping the Gram path's gradient (attn_scaled = 0) is caught.
    settings = VSA_SETTINGS[0]
    case = ragged_case(seed=17)
    upstream = torch.randn(case.img.shape[0], case.cap.shape[0], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
    _, (d_scores, attn, scaled) = _vsa_kernel(case, settings, upstream)
    _, d_cap = _vsa_contraction(case, (d_scores, attn, torch.zeros_like(scaled)), 2)
    finite = case.with_padding(0.0).requiring_grad()
    out = max_similarity_reference(finite.img, finite.cap, case.lens, case.img_lens, **settings)
    _, want = torch.autograd.grad(out, [finite.img, finite.cap], upstream)
    with pytest.raises(AssertionError):
        assert_close(d_cap, want, F64_PAIR_BACKWARD, what="d cap without the Gram term")


# ----------------------------------------------------------------------------------------------
# GPU: numerics against the float64 reference
# ----------------------------------------------------------------------------------------------

def _in(case, dtype):
    """The case with features representable in dtype (float64 otherwise): the float64 reference
    then scores the very inputs the kernel reads, so that a near-tie among maxima cannot be
    decided one way by the rounding of the inputs and the other way by the reference."""
    return case.to(dtype).to(torch.float64)


@requires_gpu
@pytest.mark.parametrize("settings", settings_grid(), ids=settings_id)
def test_every_setting_matches_the_reference_fp32(settings):
    assert_head_matches_reference(ragged_case(n_img=4, n_cap=5, R=7, L=9, d=24), settings,
                                  backend="cuda", dtype=torch.float32, device="cuda")


@requires_gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("settings", settings_grid(normalize=("none",)), ids=settings_id)
def test_every_setting_low_precision_by_the_2x_rule(settings, dtype):
    assert_head_matches_reference(_in(ragged_case(n_img=4, n_cap=5, R=7, L=9, d=24, scale=0.5), dtype),
                                  settings, backend="cuda", dtype=dtype, device="cuda")


@requires_gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("settings", settings_grid(pools=("mean", "max", "softmax"), normalize=("none",)),
                         ids=settings_id)
def test_edge_cases(name, dtype, settings):
    # ties: exact in every dtype, so the first argmax must win on both sides
    assert_head_matches_reference(_in(CASES[name](), dtype), settings, backend="cuda", dtype=dtype,
                                  device="cuda")


# (n_img, n_cap, R, L, d): several image blocks and caption groups, the 16-byte load path
# (d % 8 == 0) and the scalar one, every tile shape (col_frags 8 / 4 / 2).
SHAPES = [(1, 1, 1, 1, 1), (3, 40, 36, 30, 1024), (9, 50, 36, 30, 64), (7, 30, 37, 128, 33),
          (2, 5, 161, 20, 24), (2, 3, 400, 12, 16), (17, 3, 5, 3, 8)]


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("direction", contract.HEAD_DIRECTIONS)
def test_tile_shapes(shape, dtype, direction):
    n_img, n_cap, R, L, d = shape
    case = _in(ragged_case(n_img, n_cap, R, L, d, scale=d ** -0.5, seed=sum(shape)), dtype)
    settings = dict(direction=direction, pool="lse", tau=0.5, leaky=True)
    assert_head_matches_reference(case, settings, backend="cuda", dtype=dtype, device="cuda")


@requires_gpu
def test_forward_writes_every_entry_of_a_poisoned_output():
    case = ragged_case(6, 40, 36, 25, 64, scale=0.125).to(torch.float32, "cuda")
    for direction in contract.HEAD_DIRECTIONS:
        settings = dict(direction=direction, pool="softmax", tau=0.5, leaky=False, both_scale=0.5)
        out = torch.full((6, 40), float("nan"), device="cuda")
        options = maxsim_ops.Options(**settings)
        maxsim_ops.maxsim_forward(case.img, case.cap, case.lens, case.img_lens, options, out=out)
        assert_close_to_reference(out.cpu().double(), reference_scores(case, settings), dtype=torch.float32,
                                  what=f"poisoned output {direction}")


@requires_gpu
@pytest.mark.parametrize("direction", contract.HEAD_DIRECTIONS)
def test_gradients_with_poisoned_allocations_and_small_chunks(direction, monkeypatch):
    # Every buffer the wrapper allocates starts as NaN (integers -7), and the coefficient budget
    # forces one image per chunk: the backward must still write every gradient entry.
    monkeypatch.setattr(maxsim_ops, "COEFFICIENT_BUFFER_BYTES", 1)
    with poisoned_allocations():
        assert_head_matches_reference(ragged_case(5, 6, 9, 7, 16), dict(direction=direction, pool="lse", tau=0.5),
                                      backend="cuda", dtype=torch.float32, device="cuda")


def _grads(case, settings):
    case = case.requiring_grad()
    out = rcar_fast.max_similarity(case.img, case.cap, case.lens, img_lens=case.img_lens, backend="cuda",
                                   **settings)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    return torch.autograd.grad(out, [case.img, case.cap], upstream)


@requires_gpu
@pytest.mark.parametrize("direction", ("t2i", "i2t"))
def test_backward_is_deterministic_and_chunking_does_not_change_it(direction, monkeypatch):
    case = ragged_case(12, 30, 36, 20, 64, scale=0.125, seed=5).to(torch.bfloat16, "cuda")
    settings = dict(direction=direction, pool="softmax", tau=0.5, leaky=True)
    first, again = _grads(case, settings), _grads(case, settings)
    # one image per chunk: each output element still sums the same terms in the same order
    monkeypatch.setattr(maxsim_ops, "COEFFICIENT_BUFFER_BYTES", 1)
    chunked = _grads(case, settings)
    for what, a, b, c in zip(("d img", "d cap"), first, again, chunked):
        assert_bit_equal(b, a, what=f"{what} rerun")
        assert_bit_equal(c, a, what=f"{what} chunked")


@requires_gpu
def test_tie_gradient_goes_to_the_first_region_and_word():
    # Region 1 repeats region 0 and word 1 repeats word 0 (tie_case): the repeat gets nothing.
    case = tie_case().to(torch.float32, "cuda")
    for direction in ("t2i", "i2t"):
        d_img, d_cap = _grads(case, dict(direction=direction, pool="sum"))
        repeat_grad = d_img[:, 1] if direction == "t2i" else d_cap[:, 1]
        assert bool((repeat_grad == 0).all()), f"{direction}: the repeated row took gradient"


@requires_gpu
def test_shape_beyond_the_tile_falls_back_under_auto_and_is_refused_by_name():
    case = ragged_case(2, 3, 700, 4, 8).to(torch.float32, "cuda")
    with pytest.raises(BackendUnavailable, match="R=700"):
        rcar_fast.max_similarity(case.img, case.cap, case.lens, img_lens=case.img_lens, backend="cuda")
    out = rcar_fast.max_similarity(case.img, case.cap, case.lens, img_lens=case.img_lens, backend="auto")
    assert out.shape == (2, 3) and bool(torch.isfinite(out).all())


@requires_gpu
def test_opcheck():
    case = ragged_case(3, 4, 5, 6, 8, pad=0.0).to(torch.float32, "cuda").requiring_grad()
    options = ("both", "softmax", 0.5, True, 0.5)
    torch.library.opcheck(maxsim_ops.maxsim_cuda_op, (case.img, case.cap, case.lens, case.img_lens, *options))
    grad = torch.randn(3, 4, device="cuda")
    torch.library.opcheck(torch.ops.rcar_fast.maxsim_cuda_backward.default,
                          (grad, case.img.detach(), case.cap.detach(), case.lens, case.img_lens, *options))


# ---------------------------------------------------------------------------------------------
# GPU: CHAN's VSA coding
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("dtype", (torch.float32, *LOW_PRECISION), ids=str)
@pytest.mark.parametrize("settings", VSA_SETTINGS, ids=_vsa_id)
def test_vsa_matches_the_reference(settings, dtype):
    # forward and both gradients, NaN padding, by the 1e-4 / 2x rules
    for case in (ragged_case(n_img=4, n_cap=5, R=7, L=9, d=24, scale=0.5), tie_case(), single_word_case()):
        assert_head_matches_reference(_in(case, dtype), settings, backend="cuda", dtype=dtype, device="cuda")


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_vsa_tile_shapes(shape, dtype):
    n_img, n_cap, R, L, d = shape
    case = _in(ragged_case(n_img, n_cap, R, L, d, scale=d ** -0.5, seed=sum(shape)), dtype)
    settings = dict(direction="i2t", coding="vsa", pool="lse", tau=0.5, vsa_tau=0.1)
    assert_head_matches_reference(case, settings, backend="cuda", dtype=dtype, device="cuda")


@requires_gpu
def test_vsa_forward_writes_every_entry_of_a_poisoned_output():
    case = ragged_case(6, 40, 36, 25, 64, scale=0.125).to(torch.float32, "cuda")
    settings = dict(direction="i2t", pool="softmax", tau=0.5, leaky=False, both_scale=1.0, coding="vsa",
                    vsa_tau=0.1)
    out = torch.full((6, 40), float("nan"), device="cuda")
    maxsim_ops.maxsim_forward(case.img, case.cap, case.lens, case.img_lens, maxsim_ops.Options(**settings),
                               out=out)
    assert_close_to_reference(out.cpu().double(), reference_scores(case, settings), dtype=torch.float32,
                              what="poisoned VSA output")


@requires_gpu
def test_vsa_gradients_with_poisoned_allocations_and_small_chunks(monkeypatch):
    # NaN-filled allocations (the kernel's three per-pair buffers among them) and one image per
    # backward chunk: every buffer entry must still be written.
    monkeypatch.setattr(scan_ops, "BACKWARD_BUFFER_BYTES", 1)
    with poisoned_allocations():
        assert_head_matches_reference(ragged_case(5, 6, 9, 7, 16), VSA_SETTINGS[6], backend="cuda",
                                      dtype=torch.float32, device="cuda")


@requires_gpu
def test_vsa_backward_is_deterministic():
    case = ragged_case(12, 30, 36, 20, 64, scale=0.125, seed=5).to(torch.bfloat16, "cuda")
    settings = dict(direction="i2t", coding="vsa", pool="lse", tau=0.5, vsa_tau=0.1)
    first, again = _grads(case, settings), _grads(case, settings)
    for what, a, b in zip(("d img", "d cap"), first, again):
        assert_bit_equal(b, a, what=f"VSA {what} rerun")


@requires_gpu
def test_vsa_pairs_through_the_all_pairs_kernel_equal_the_reference():
    case = ragged_case(5, 6, 9, 7, 16, seed=21)
    img_idx = torch.tensor([4, 0, 4, 3, 1, 0, 2])
    cap_idx = torch.tensor([0, 5, 0, 1, 2, 2, 3])
    kw = dict(direction="i2t", pool="mean", tau=0.5, leaky=False, both_scale=1.0, coding="vsa", vsa_tau=0.1)
    run = case.to(torch.float32, "cuda")  # NaN padding: never read
    got = maxsim_ops.MaxSimPairsCuda.fn(run.img, run.cap, run.lens, run.img_lens, img_idx.cuda(), cap_idx.cuda(),
                                         **kw)
    want = maxsim_ops.MaxSimPairsReference.fn(case.img, case.cap, case.lens, case.img_lens, img_idx, cap_idx,
                                                    **kw)
    assert_close_to_reference(got.cpu().double(), want, dtype=torch.float32, what="VSA pair scores")


@requires_gpu
def test_vsa_opcheck():
    case = ragged_case(3, 4, 5, 6, 8, pad=0.0).to(torch.float32, "cuda").requiring_grad()
    options = ("lse", 0.5, 0.1)
    torch.library.opcheck(maxsim_ops.maxsim_vsa_cuda_op, (case.img, case.cap, case.lens, case.img_lens, *options))
    grad = torch.randn(3, 4, device="cuda")
    torch.library.opcheck(maxsim_ops.maxsim_vsa_cuda_backward_op,
                          (grad, case.img.detach(), case.cap.detach(), case.lens, case.img_lens, *options))


# ---------------------------------------------------------------------------------------------
# Pair lists through the all-pairs kernel (the blocking runs on any all-pairs function: here
# the C++ CPU one, so that it is checked without a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs_per_block", [1, 3, 512])
@pytest.mark.parametrize("direction", ["t2i", "both"])
def test_pair_blocks_equal_the_listed_entries_of_all_pairs(pairs_per_block, direction):
    from rcar_fast.ops import maxsim as maxsim_ops
    from rcar_fast.ops.maxsim import pairs_through_all_pairs

    gen = torch.Generator().manual_seed(7)
    img = torch.randn(5, 6, 16, generator=gen, dtype=torch.float64)
    cap = torch.randn(4, 7, 16, generator=gen, dtype=torch.float64)
    lens = torch.tensor([7, 1, 4, 6])
    img_lens = torch.tensor([6, 2, 5, 1, 3])
    cap[1, 1:] = float("nan")
    img[3, 1:] = float("nan")
    img_idx = torch.tensor([4, 0, 4, 3, 1, 0, 2, 4, 3])
    cap_idx = torch.tensor([0, 3, 0, 1, 2, 2, 3, 1, 1])
    kw = dict(direction=direction, pool="lse", tau=0.5, leaky=True, both_scale=0.5)
    img_g, cap_g = img.clone().requires_grad_(), cap.clone().requires_grad_()
    got = pairs_through_all_pairs(maxsim_ops.MaxSimCpu.fn, img_g, cap_g, lens, img_lens, img_idx,
                                  cap_idx, kw, pairs_per_block=pairs_per_block)
    want = maxsim_ops.MaxSimPairsReference.fn(img, cap, lens, img_lens, img_idx, cap_idx, **kw)
    assert_close(got, want, F64_PAIRS, what="pair scores")
    weights = torch.linspace(-1, 2, len(img_idx), dtype=torch.float64)
    d_img, d_cap = torch.autograd.grad((got * weights).sum(), (img_g, cap_g))
    img_r, cap_r = img.nan_to_num(0).requires_grad_(), cap.nan_to_num(0).requires_grad_()
    ref = maxsim_ops.MaxSimPairsReference.fn(img_r, cap_r, lens, img_lens, img_idx, cap_idx, **kw)
    r_img, r_cap = torch.autograd.grad((ref * weights).sum(), (img_r, cap_r))
    assert_close(d_img, r_img, F64_BACKEND_AGREE, what="d img")
    assert_close(d_cap, r_cap, F64_BACKEND_AGREE, what="d cap")
    assert not torch.isnan(d_img).any() and not torch.isnan(d_cap).any()
    with torch.no_grad():
        again = pairs_through_all_pairs(maxsim_ops.MaxSimCpu.fn, img, cap, lens, img_lens, img_idx,
                                        cap_idx, kw, pairs_per_block=pairs_per_block)
    assert torch.equal(again, got.detach())


def test_pair_blocks_carry_the_vsa_coding(monkeypatch):
    # MaxSimPairsCuda hands coding / vsa_tau on to the all-pairs function (here the reference
    # one in the CUDA backend's place, so that the plumbing is checked without a GPU).
    from rcar_fast.ops.maxsim import MaxSimCuda, MaxSimPairsCuda

    monkeypatch.setattr(MaxSimCuda, "fn", staticmethod(maxsim_ops.MaxSimReference.fn))
    case = ragged_case(5, 4, 6, 7, 16, seed=22)
    img_idx = torch.tensor([4, 0, 4, 3, 1, 0, 2, 4, 3])
    cap_idx = torch.tensor([0, 3, 0, 1, 2, 2, 3, 1, 1])
    kw = dict(direction="i2t", pool="softmax", tau=0.5, leaky=False, both_scale=1.0, coding="vsa", vsa_tau=0.2)
    got = MaxSimPairsCuda.fn(case.img, case.cap, case.lens, case.img_lens, img_idx, cap_idx, **kw)
    want = maxsim_ops.MaxSimPairsReference.fn(case.img, case.cap, case.lens, case.img_lens, img_idx,
                                                    cap_idx, **kw)
    assert_close(got, want, F64_PAIRS, what="VSA pair scores")
    without = MaxSimPairsCuda.fn(case.img, case.cap, case.lens, case.img_lens, img_idx, cap_idx,
                                 **{**kw, "coding": "max"})
    assert not torch.allclose(without, want)  # the coding made the difference


def test_pair_blocks_of_an_empty_list():
    from rcar_fast.ops import maxsim as maxsim_ops
    from rcar_fast.ops.maxsim import pairs_through_all_pairs

    img, cap = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = pairs_through_all_pairs(maxsim_ops.MaxSimCpu.fn, img, cap, torch.tensor([3, 2]),
                                  torch.tensor([3, 3]), torch.empty(0, dtype=torch.long),
                                  torch.empty(0, dtype=torch.long),
                                  dict(direction="t2i", pool="sum", tau=0.1, leaky=False, both_scale=0.5))
    assert out.shape == (0,) and out.dtype == torch.float32


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxsim_pairs_and_top_k_on_cuda(dtype):
    """rcar_fast.maxsim's pair list and top-k (with differentiable values) on backend='cuda'
    equal the all-pairs matrix's entries."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 9, 32, generator=gen).to("cuda", dtype)
    d = torch.randn(11, 20, 32, generator=gen).to("cuda", dtype)
    q_lens = torch.tensor([9, 1, 5, 7, 2, 9], device="cuda")
    d_lens = torch.tensor([20, 3, 8, 1, 20, 11, 5, 6, 7, 19, 2], device="cuda")
    full = rcar_fast.maxsim(q, d, q_lens, d_lens, backend="cuda")
    q_idx = torch.tensor([0, 5, 5, 2, 1, 0], device="cuda")
    d_idx = torch.tensor([10, 0, 3, 3, 7, 10], device="cuda")
    listed = rcar_fast.maxsim(q, d, q_lens, d_lens, pairs=(q_idx, d_idx), backend="cuda")
    assert torch.equal(listed, full[q_idx, d_idx])
    q_g = q.clone().requires_grad_()
    values, indices = rcar_fast.maxsim(q_g, d, q_lens, d_lens, k=3, doc_block=4, backend="cuda")
    assert torch.equal(values.detach(), full.gather(1, indices))
    values.sum().backward()
    assert q_g.grad is not None and torch.isfinite(q_g.grad).all()
