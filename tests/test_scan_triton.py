"""The Triton SCAN kernels (forward and backward) against the float64 reference.

On CPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1), on small
grids whose sizes are off every tile size: R=5 regions, d=20, Lmax=7 with ragged lengths
including 1 and Lmax, NaN in every caption padding position. GPU tests run at realistic
sizes in fp32/fp16/bf16 with the 2x rule.
"""
import math
import os

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast import reference as ref
from rcar_fast.contract import AGGREGATIONS as AGGS
from rcar_fast.contract import RAW_NORMS, scan_published
from tests import sm90
from tests.conftest import requires_gpu
from tests.tolerances import assert_close_to_reference
from tests.conftest import requires_interpreter

LENS = (1, 7, 3, 5, 2)


def _inputs(n_img=3, lens=LENS, regions=5, dim=20, max_len=None, dtype=torch.float32,
            padding=float("nan"), device="cpu", scale=1.0):
    """img (n_img, R, d), cap (n_cap, Lmax, d) with `padding` beyond each length, lens."""
    max_len = max_len or max(lens)
    img = torch.randn(n_img, regions, dim, dtype=torch.float64) * scale
    cap = torch.randn(len(lens), max_len, dim, dtype=torch.float64) * scale
    lens = torch.tensor(lens)
    pad = torch.arange(max_len)[None, :] >= lens[:, None]
    cap[pad] = padding
    return img.to(device, dtype), cap.to(device, dtype), lens.to(device)


def _options(direction, raw_norm="clipped_l2norm", agg="mean"):
    # MS-COCO's published settings: its i2t lse_lambda (20) is the largest published one.
    return scan_published(direction, "coco", raw_norm=raw_norm, agg=agg)


def _reference(img, cap, lens, **opts):
    return ref.scan_similarity_vectorized(img.double(), cap.double(), lens, **opts)


def _real_words(lens, max_len):
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def _triton(img, cap, lens, **opts):
    return rcar_fast.scan_similarity(img, cap, lens, backend="triton", **opts)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = sorted({(n, "mean") for n in RAW_NORMS} | {("clipped_l2norm", a) for a in AGGS})


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_norm,agg", FORWARD_CASES)
def test_forward_matches_float64_reference(direction, raw_norm, agg):
    img, cap, lens = _inputs()
    opts = _options(direction, raw_norm, agg)
    out = _triton(img, cap, lens, **opts)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32,
                              what=f"scan triton {direction} {raw_norm} {agg}")


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_several_length_buckets(direction):
    # lengths 1..20 fall into three power-of-two buckets: three launches whose results must
    # land in the right columns
    lens = (20, 1, 9, 16, 17, 4, 8, 3)
    img, cap, lens = _inputs(n_img=4, lens=lens, regions=6, dim=24)
    opts = _options(direction)
    out = _triton(img, cap, lens, **opts)
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_single_region_and_single_feature(direction):
    # R = 1 (i2t pads the queries to 1: 16 images per tile), d = 1
    img, cap, lens = _inputs(n_img=3, regions=1, dim=1)
    for raw_norm in ("clipped_l2norm", "softmax"):
        opts = _options(direction, raw_norm)
        out = _triton(img, cap, lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_is_never_read(direction):
    # NaN, large values or zeros in the padding: bit-identical results
    results = []
    for padding in (float("nan"), 123.0, 0.0):
        torch.manual_seed(0)
        img, cap, lens = _inputs(padding=padding)
        results.append(_triton(img, cap, lens, **_options(direction, agg="lse")))
    assert torch.isfinite(results[0]).all()
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_writes_every_output_element(direction):
    from rcar_fast.kernels import scan as kernels

    img, cap, lens = _inputs()
    opts = _options(direction)
    problem = kernels.build_problem(img, cap, lens, **opts)
    poisoned = torch.full((3, 5), float("nan"))
    out = kernels.scan_forward(problem, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
def test_non_contiguous_inputs():
    img, cap, lens = _inputs(dim=40)
    # every stride differs from the contiguous layout: d every other element, owners
    # interleaved through a transposed base
    img_view = img.transpose(0, 1).contiguous().transpose(0, 1)[:, :, ::2]
    cap_view = cap.permute(1, 0, 2).contiguous().permute(1, 0, 2)[:, :, 1::2]
    assert not img_view.is_contiguous() and not cap_view.is_contiguous()
    for direction in ("t2i", "i2t"):
        opts = _options(direction)
        out = _triton(img_view, cap_view, lens, **opts)
        expected = _triton(img_view.contiguous(), cap_view.contiguous(), lens, **opts)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
        assert_close_to_reference(out, _reference(img_view, cap_view, lens, **opts),
                                  dtype=torch.float32)


@requires_interpreter
def test_float16_interpreter_two_x_rule():
    img, cap, lens = _inputs(dtype=torch.float16)
    for direction in ("t2i", "i2t"):
        opts = _options(direction)
        out = _triton(img, cap, lens, **opts)
        assert out.dtype == torch.float32
        ref16 = ref.scan_similarity_vectorized(img, cap, lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float16,
                                  ref_lowp=ref16)


@requires_interpreter
def test_float64_output_is_float64():
    img, cap, lens = _inputs(dtype=torch.float64)
    opts = _options("t2i")
    out = _triton(img, cap, lens, **opts)
    assert out.dtype == torch.float64
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float64)


@requires_interpreter
def test_dispatch_reasons():
    cpu = torch.device("cpu")
    assert dispatch.rejection("scan", "triton", cpu, torch.float32) is None
    reason = dispatch.rejection("scan", "triton", cpu, torch.bfloat16)
    assert reason is not None and "interpreter" in reason
    # the interpreter is for tests: auto never picks triton for CPU tensors
    assert dispatch.choose("scan", "auto", cpu, torch.float32).backend != "triton"
    with pytest.raises(dispatch.BackendUnavailable, match="bfloat16"):
        img, cap, lens = _inputs(dtype=torch.bfloat16)
        _triton(img, cap, lens)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

def _gradients(fn, img, cap, lens, weights, **opts):
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    out = fn(img, cap, lens, **opts)
    (out * weights).sum().backward()
    return out.detach(), img.grad, cap.grad


def _check_gradients(img, cap, lens, *, dtype, **opts):
    """Kernel gradients vs autograd through the float64 reference (same weights)."""
    weights = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64).to(img.device)
    out_dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    out, dimg, dcap = _gradients(_triton, img, cap, lens, weights.to(out_dtype), **opts)
    ref_out, rimg, rcap = _gradients(_reference, img.double(), cap.double(), lens, weights, **opts)
    real = _real_words(lens, cap.shape[1])
    assert dimg.dtype == img.dtype and dcap.dtype == cap.dtype
    assert_close_to_reference(out, ref_out, dtype=dtype, what="forward")
    assert_close_to_reference(dimg, rimg, dtype=dtype, what="d img")
    assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, what="d cap (real words)")
    assert torch.equal(dcap[~real], torch.zeros_like(dcap[~real])), "gradient in caption padding"


BACKWARD_CASES = [("clipped_l2norm", "mean"), ("clipped_l2norm", "lse"), ("l1norm", "max"),
                  ("softmax", "sum")]


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_norm,agg", BACKWARD_CASES)
def test_backward_float64_matches_reference(direction, raw_norm, agg):
    img, cap, lens = _inputs(dtype=torch.float64)
    _check_gradients(img, cap, lens, dtype=torch.float64, **_options(direction, raw_norm, agg))


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_backward_float32_several_buckets(direction):
    # several caption buckets: the gradient of the side that loops over them is summed over
    # launches, the other side's launches write disjoint rows
    img, cap, lens = _inputs(n_img=3, lens=(12, 1, 9, 3, 17), regions=5, dim=20)
    _check_gradients(img, cap, lens, dtype=torch.float32, **_options(direction))


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gradcheck_float64(direction):
    img, cap, lens = _inputs(n_img=2, lens=(3, 1), regions=3, dim=5, max_len=4,
                             dtype=torch.float64)
    img, cap = img.requires_grad_(), cap.requires_grad_()
    opts = _options(direction, agg="lse")

    def fn(a, c):
        return _triton(a, c, lens, **opts)

    assert torch.autograd.gradcheck(fn, (img, cap), fast_mode=True, atol=1e-7, rtol=1e-5)


@requires_interpreter
def test_gradient_of_one_input_only():
    img, cap, lens = _inputs(dtype=torch.float64)
    img.requires_grad_()
    out = _triton(img, cap, lens, **_options("t2i"))
    out.sum().backward()
    assert img.grad is not None and cap.grad is None
    img2 = img.detach().clone().requires_grad_()
    _reference(img2, cap, lens, **_options("t2i")).sum().backward()
    assert_close_to_reference(img.grad, img2.grad, dtype=torch.float64)


@requires_interpreter
@pytest.mark.parametrize("of_x", [True, False])
def test_backward_kernels_overwrite_poisoned_targets(of_x):
    # the backward kernels store their rows on the first iteration (no read of the target):
    # a NaN-filled target gives the same real rows as a zeroed one, twice in a row (the
    # kernels are idempotent, which makes them safe to autotune)
    from rcar_fast.kernels import scan as kernels

    img, cap, lens = _inputs()
    problem = kernels.build_problem(img, cap, lens, **_options("t2i"))
    dsim = torch.randn(3, 5)
    (xg,), (yg,) = problem.x.groups, problem.y.groups
    kernel = kernels._scan_bwd_x_kernel if of_x else kernels._scan_bwd_y_kernel
    feats = problem.x.feats if of_x else problem.y.feats
    clean = torch.zeros(feats.shape)
    kernels._launch_backward(kernel, None, problem, xg, yg, dsim, clean, parallel_over_x=of_x)
    poisoned = torch.full(feats.shape, float("nan"))
    for _ in range(2):
        kernels._launch_backward(kernel, None, problem, xg, yg, dsim, poisoned, parallel_over_x=of_x)
        rows = torch.ones(feats.shape[:2], dtype=torch.bool) if of_x else _real_words(lens, 7)
        assert torch.equal(poisoned[rows], clean[rows])


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, fp32/fp16/bf16, the 2x rule
# ---------------------------------------------------------------------------------------------

def _realistic(n_img, per_image, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_cap = n_img * per_image
    lens = torch.randint(6, 31, (n_cap,), generator=gen)
    lens[0], lens[-1] = 1, 30
    img = torch.nn.functional.normalize(torch.randn(n_img, 36, 1024, generator=gen), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, 30, 1024, generator=gen), dim=-1)
    cap[~_real_words(lens, 30)] = float("nan")
    return img.cuda().to(dtype), cap.cuda().to(dtype), lens.cuda()


def _reference_lowp(img, cap, lens, **opts):
    # the reference's own low-precision error; NaN padding is masked inside the reference
    return ref.scan_similarity_vectorized(img, cap, lens, **opts)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gpu_forward_realistic(direction, dtype):
    img, cap, lens = _realistic(40, 5, dtype)
    for raw_norm, agg in (("clipped_l2norm", "mean"), ("clipped_l2norm", "lse"), ("softmax", "max")):
        opts = _options(direction, raw_norm, agg)
        out = _triton(img, cap, lens, **opts)
        ref64 = _reference(img, cap, lens, **opts)
        lowp = None if dtype == torch.float32 else _reference_lowp(img, cap, lens, **opts)
        assert_close_to_reference(out, ref64, dtype=dtype, ref_lowp=lowp,
                                  what=f"{direction} {raw_norm} {agg} {dtype}")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gpu_backward_realistic(direction, dtype):
    img, cap, lens = _realistic(12, 2, dtype)
    opts = _options(direction)
    weights = torch.randn(12, 24, device="cuda", dtype=torch.float64)
    out, dimg, dcap = _gradients(_triton, img, cap, lens, weights.float(), **opts)
    _, rimg, rcap = _gradients(_reference, img.double(), cap.double(), lens, weights, **opts)
    real = _real_words(lens, 30)
    if dtype == torch.float32:
        assert_close_to_reference(dimg, rimg, dtype=dtype, what="d img")
        assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, what="d cap")
    else:
        _, limg, lcap = _gradients(_reference_lowp, img, cap, lens, weights.to(dtype), **opts)
        assert_close_to_reference(dimg, rimg, dtype=dtype, ref_lowp=limg, what="d img")
        assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, ref_lowp=lcap[real],
                                  what="d cap")
    assert torch.equal(dcap[~real], torch.zeros_like(dcap[~real]))


@requires_gpu
def test_gpu_training_batch_memory():
    # a 128 x 128 training step never holds (B, B, L, d) or (B, B, R, L) tensors: the peak
    # beyond inputs + gradients is far below one (B, B, R, L) fp32 tensor
    img, cap, lens = _realistic(128, 1, torch.bfloat16)
    img.requires_grad_()
    cap.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _triton(img, cap, lens, **_options("t2i")).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pairs_tensor = 128 * 128 * 36 * 30 * 4
    inputs = img.numel() * 4 + cap.numel() * 4  # fp32 gradient buffers
    assert extra < inputs * 3 + pairs_tensor / 8, f"peak extra memory {extra / 2**20:.1f} MiB"
    assert math.isfinite(img.grad.float().sum().item())


# ---------------------------------------------------------------------------------------------
# Offline compile for the H100 (no GPU needed, tests/sm90.py): every configuration the
# autotuners keep for a COCO-sized problem (R=36 regions, d=1024) must compile for sm_90 and
# fit its shared memory, forward and both backward kernels. Catches GPU-only failures (tl.dot
# shape/dtype rules, fp16/bf16 lowering, the software pipeline's shared memory) in CPU-only CI.
# ---------------------------------------------------------------------------------------------

# (direction, dtype, raw_norm, agg, caption lengths). The launchers bucket captions by
# power-of-two length, one launch (and autotune key) per bucket. Lengths (50,) give the Lmax
# bucket of a COCO batch (C_PAD = Q_PAD = 64: the largest tiles per owner), 12 the most common
# one (t2i Q_PAD 16, up to 16 captions per tile). The default set compiles every configuration
# the prunes keep there, fwd and both bwd kernels, each input dtype (~60 compiles, 1-3 minutes
# on 2 CPUs). RCAR_FAST_SM90_FULL=1 adds every bucket of a COCO batch (lengths 7, 12, 23, 50:
# t2i Q_PAD 8..64 with up to 32 captions per tile, i2t C_PAD 16..64) for every dtype and
# direction: ~450 compiles, about half an hour.
SCAN_SM90_CASES = [
    ("t2i", "bf16", "clipped_l2norm", "mean", (12, 50)),  # SCAN t2i as trained (bf16 autocast)
    ("i2t", "fp16", "softmax", "lse", (50,)),
    ("i2t", "fp32", "l1norm", "max", (50,)),              # the exact fp32 (FMA) path
]
SCAN_SM90_FULL = os.environ.get("RCAR_FAST_SM90_FULL") == "1"
if SCAN_SM90_FULL:
    SCAN_SM90_CASES += [(direction, dtype, "clipped_l2norm", agg, (7, 12, 23, 50))
                        for direction, agg in (("t2i", "mean"), ("i2t", "lse"))
                        for dtype in ("fp32", "fp16", "bf16")]

_SCAN_SM90_SCRIPT = r"""
import json, sys
import torch
from rcar_fast.kernels import scan as kernels
from tests import sm90

# The context Gram matrices come from the Gram kernel (compiled by tests/test_gram.py); only
# their shape, dtype and strides matter here.
kernels.context_gram = lambda x: torch.zeros(x.shape[0], x.shape[1], x.shape[1])
recorders = dict(zip(("fwd", "bwd_x", "bwd_y"),
                     sm90.record(kernels, "_fwd_tuned", "_bwd_x_tuned", "_bwd_y_tuned")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
launches, owners = [], []
for case, (direction, dtype, raw_norm, agg, lens) in enumerate(json.loads(sys.argv[1])):
    for rec in recorders.values():
        rec.launches.clear()
    # The real launchers (TRITON_INTERPRET unset: their GPU path) on CPU tensors, recorded.
    img = torch.randn(4, 36, 1024).to(DTYPES[dtype])
    cap = torch.randn(len(lens), max(lens), 1024).to(DTYPES[dtype])
    problem = kernels.build_problem(img, cap, torch.tensor(lens), direction=direction,
                                    raw_norm=raw_norm, smooth=9.0, agg=agg, lse_lambda=6.0)
    kernels.scan_forward(problem)
    kernels.scan_backward(problem, torch.ones(problem.n_img, problem.n_cap), True, True)
    for name, rec in recorders.items():
        assert rec.launches, f"{name} was not launched"
        for nargs, kwargs in rec.launches:
            for config in rec.configs(nargs, kwargs):
                launches.append((rec.jit_fn, {**nargs, **kwargs}, config))
                owners.append(dict(case=case, kernel=name, C_PAD=kwargs["C_PAD"],
                                   Q_PAD=kwargs["Q_PAD"], config=str(config)))
builds = sm90.compile_many(launches)
results = [[] for _ in json.loads(sys.argv[1])]
for owner, build in zip(owners, builds):
    results[owner["case"]].append(dict(owner, **build))
sm90.emit(results)
"""


@pytest.fixture(scope="module")
def scan_sm90_builds():
    return sm90.run_offline(_SCAN_SM90_SCRIPT, SCAN_SM90_CASES,
                            timeout=4 * 3600 if SCAN_SM90_FULL else 1500)


@sm90.requires_sm90_compiler
@pytest.mark.parametrize("index", range(len(SCAN_SM90_CASES)),
                         ids=["-".join(map(str, c[:4])) + f"-L{','.join(map(str, c[4]))}"
                              for c in SCAN_SM90_CASES])
def test_gpu_configurations_compile_for_sm90(scan_sm90_builds, index):
    builds = scan_sm90_builds[index]
    assert {b["kernel"] for b in builds} == {"fwd", "bwd_x", "bwd_y"}
    failures = [f"{b['kernel']} C_PAD={b['C_PAD']} Q_PAD={b['Q_PAD']} {b['config']}: "
                + (b["error"] or f"needs {b['shared']} bytes of shared memory")
                for b in builds
                if b["error"] is not None or not 0 < b["shared"] <= sm90.H100_SHARED_BYTES]
    assert not failures, f"{len(failures)} of {len(builds)} configurations fail:\n" + "\n".join(failures)
