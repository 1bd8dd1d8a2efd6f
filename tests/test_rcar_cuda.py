"""The RCAR head on the CUDA C++ backend (csrc/cuda/rcar.cu, rcar_fast/ops/rcar.py),
eval-mode forward. Without a GPU: the dispatcher's reasons and the weight-table layout; with a
GPU: every regulator mode, step count and direction against the float64 reference."""
import copy

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.contract import rcar_smooth
from rcar_fast.ops import rcar as rcar_ops
from rcar_fast.reference import module_counts
from tests.conftest import requires_gpu
from tests.inputs import make_inputs
from tests.tolerances import GRAM_IDENTITY_VS_ATTENDED_CONTEXT, assert_close, assert_close_to_reference

# (regulator, steps): every mode, the published settings, the plain baseline (only_rcr 0).
MODES = [("only_rar", 0), ("only_rar", 2), ("only_rcr", 0), ("only_rcr", 1), ("only_rcr", 2),
         ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]


def _head(regulator, steps, direction, d, s, device="cpu"):
    head = rcar_fast.RCARSimilarity(embed_dim=d, sim_dim=s, regulator=regulator, steps=steps,
                                    direction=direction, smooth=rcar_smooth(direction))
    with torch.no_grad():  # the official init zeroes biases: make them matter
        for name, param in head.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.1, 0.1)
    return head.to(device).eval()


def _inputs(n_img, n_cap, R, d, lens, *, lmax=None, dtype=torch.float32, **kw):
    """make_inputs with unit-norm features (as the encoders give) and NaN in the caption padding."""
    return make_inputs(n_img, n_cap, R, d, lmax, lens=lens, unit_norm=True, dtype=dtype, **kw)


# ----------------------------------------------------------------------------------------------
# Runs anywhere
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a GPU-less machine")
def test_requesting_cuda_for_cpu_tensors_raises_with_the_reason():
    native = dispatch.native_module()
    if isinstance(native, str):
        pytest.skip(native)
    head = _head("coop_rcar", 2, "t2i", 16, 8)
    img, cap, lens = _inputs(2, 3, 4, 16, [2, 3, 1])
    expected = "no CUDA GPU is visible" if native.built_with_cuda() else "built without CUDA"
    with pytest.raises(rcar_fast.BackendUnavailable, match=expected):
        head(img, cap, lens, backend="cuda")
    if native.built_with_cuda():
        assert "rcar" in rcar_fast.backends()["cuda"]["ops"]


@pytest.mark.parametrize("regulator,steps", MODES)
def test_weight_table_follows_the_kernel_layout(regulator, steps):
    """The order and shapes documented in csrc/cuda/rcar.cu (RcarProblem)."""
    d, s = 12, 6
    head = _head(regulator, steps, "t2i", d, s)
    tensors = rcar_ops.weight_tensors(head)
    counts = module_counts(regulator, steps)
    expected = []
    expected += [(d, s), (s,)] * counts["alv"]
    expected += [(s, 2 * s), (2 * s,), (2 * s, d), (d,), (s, s // 2), (s // 2,), (s // 2,), (1,)] * counts["rcr"]
    expected += [(s, s), (s,), (s, s), (s,), (s,), (1,)] * counts["rar"]
    expected += [(s,), (1,)]
    assert [tuple(t.shape) for t in tensors] == expected
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    # (in, out) matrices: the first alignment matrix is the Linear weight transposed
    if counts["alv"]:
        assert torch.equal(tensors[0], head.alv_modules[0].sim_transform_w.weight.detach().t())
    assert torch.equal(tensors[-2], head.sim_eval_w.weight.detach().reshape(-1))


def test_problem_dict_matches_what_the_binding_reads():
    from tests.test_scan_cuda import binding_fields

    head = _head("coop_rcar", 2, "i2t", 16, 8)
    img, cap, lens = _inputs(2, 3, 4, 16, [2, 3, 1])
    problem = rcar_ops.problem_dict(head, img, cap, lens, 3, torch.zeros(3, dtype=torch.int64),
                                     torch.zeros(5), 2)
    assert set(problem) == binding_fields("RcarProblem")
    assert problem["regulator"] == 2 and problem["i2t"] == 1 and problem["steps"] == 2
    assert all(isinstance(v, (int, float)) for v in problem.values())


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

def _reference64(head, img, cap, lens):
    return copy.deepcopy(head).double()(img.double(), cap.double(), lens, backend="reference")


@requires_gpu
@pytest.mark.parametrize("regulator,steps", MODES)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_every_mode_fp32(regulator, steps, direction):
    d, s = 96, 32
    head = _head(regulator, steps, direction, d, s, device="cuda")
    img, cap, lens = _inputs(3, 5, 7, d, [4, 1, 9, 6, 2], device="cuda", lmax=10)
    with torch.no_grad():
        out = head(img, cap, lens, backend="cuda")
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert_close_to_reference(out, _reference64(head, img, cap, lens), dtype=torch.float32,
                              what=f"rcar cuda {regulator} {steps} {direction}")


@requires_gpu
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 2, [1]), (4, 6, 36, 1024, 256, [12, 30, 5, 9, 17, 1]),
                                   (2, 3, 5, 70, 30, [13, 2, 7])],
                         ids=["tiny", "published", "odd"])
def test_shapes(direction, shape):
    n_img, n_cap, R, d, s, lens = shape
    head = _head("coop_rcar", 2, direction, d, s, device="cuda")
    img, cap, lens = _inputs(n_img, n_cap, R, d, lens, device="cuda", lmax=max(lens) + 1)
    with torch.no_grad():
        out = head(img, cap, lens, backend="cuda")
    assert_close_to_reference(out, _reference64(head, img, cap, lens), dtype=torch.float32)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    head = _head("coop_rcar", 2, "t2i", 256, 64, device="cuda")
    img, cap, lens = _inputs(3, 4, 36, 256, [8, 3, 12, 5], dtype=dtype, device="cuda", lmax=12)
    with torch.no_grad():
        out = head(img, cap, lens, backend="cuda")
        ref_lowp = copy.deepcopy(head).to(dtype)(img, cap, lens, backend="reference")
    assert_close_to_reference(out, _reference64(head, img, cap, lens), dtype=dtype,
                              ref_lowp=ref_lowp)


@requires_gpu
def test_strided_inputs_and_many_pairs():
    head = _head("coop_rcar", 2, "i2t", 64, 16, device="cuda")
    img_base, cap_base, _ = _inputs(40, 60, 14, 64, [12] * 60, device="cuda")
    img, cap = img_base[::2, ::2], cap_base[::3]  # more pairs than persistent blocks
    lens = torch.randint(1, 13, (20,), device="cuda")
    with torch.no_grad():
        out = head(img, cap, lens, backend="cuda")
    assert_close_to_reference(out, _reference64(head, img, cap, lens), dtype=torch.float32)


@requires_gpu
def test_training_mode_is_refused():
    head = _head("coop_rcar", 2, "t2i", 16, 8, device="cuda").train()
    img, cap, lens = _inputs(2, 2, 3, 16, [2, 1], device="cuda")
    with pytest.raises(rcar_fast.BackendUnavailable, match="eval"):
        head(img, cap, lens, backend="cuda")


@requires_gpu
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_cuda_agrees_with_triton(direction):
    if dispatch.rejection("rcar", "triton", torch.device("cuda"), torch.float32) is not None:
        pytest.skip(dispatch.rejection("rcar", "triton", torch.device("cuda"), torch.float32))
    head = _head("coop_rcar", 2, direction, 1024, 256, device="cuda")
    img, cap, lens = _inputs(8, 20, 36, 1024, torch.randint(4, 25, (20,)).tolist(), device="cuda",
                             lmax=25)
    with torch.no_grad():
        out_cuda = head(img, cap, lens, backend="cuda")
        out_triton = head(img, cap, lens, backend="triton")
    assert_close(out_cuda, out_triton, GRAM_IDENTITY_VS_ATTENDED_CONTEXT)
