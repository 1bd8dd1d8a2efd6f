"""The ops as torch.library custom ops: torch.library.opcheck (schema, fake implementation,
autograd registration, AOT dispatch) for every op that runs here (Triton ones in the CPU
interpreter on tiny inputs, the CUDA ones in the `gpu` tests). The compiled training steps are in
tests/test_compile_training.py."""
import pytest
import torch

import rcar_fast
from rcar_fast import contract, dispatch
from rcar_fast.ops import rcar as rcar_ops
from rcar_fast.ops import scan as scan_ops
from tests.conftest import requires_gpu, requires_interpreter
from tests.tolerances import assert_close_to_reference

F64 = torch.float64
NATIVE = dispatch.rejection("scan", "cpu", torch.device("cpu"), torch.float32) is None
needs_native = pytest.mark.skipif(not NATIVE, reason="the C++ CPU extension is not built here")
OPTIONS = {"t2i": ("t2i", "clipped_l2norm", 9.0, "mean", 6.0),
           "i2t": ("i2t", "l2norm", 4.0, "lse", 5.0)}


def _inputs(n_img=4, n_cap=4, R=5, L=6, d=8, dtype=F64, grad=True):
    gen = torch.Generator().manual_seed(7)
    img = torch.randn(n_img, R, d, generator=gen, dtype=dtype).requires_grad_(grad)
    cap = torch.randn(n_cap, L, d, generator=gen, dtype=dtype)
    lens = torch.randint(1, L + 1, (n_cap,), generator=gen)
    lens[0] = L
    cap[1, lens[1]:] = float("nan") if lens[1] < L else cap[1, lens[1]:]  # padding is ignored
    return img, cap.requires_grad_(grad), lens


def _head(regulator="coop_rcar", steps=1, d=8):
    torch.manual_seed(3)
    return rcar_fast.RCARSimilarity(embed_dim=d, sim_dim=6, regulator=regulator, steps=steps).double()


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------

# The ops register when their backend modules are imported (above): rcar_fast::<name>.
TRITON = dispatch.rejection("scan", "triton", torch.device("cpu"), F64)
# Triton on CPU tensors runs in its interpreter (tests marked `interpreter`, see conftest.py).
triton_on_cpu = pytest.mark.skipif(TRITON is not None, reason=f"triton on CPU tensors: {TRITON}")
needs_interpreter = [requires_interpreter, triton_on_cpu]
SCAN_OPS = [pytest.param("scan_reference", id="reference"),
            pytest.param("scan_cpu", id="cpu", marks=needs_native),
            pytest.param("scan_triton", id="triton", marks=needs_interpreter)]
assert scan_ops.scan_reference_op and scan_ops.scan_cpu_op and scan_ops.scan_triton_op
CUDA = dispatch.rejection("scan", "cuda", torch.device("cuda"), torch.float32)
needs_cuda_kernels = pytest.mark.skipif(CUDA is not None, reason=f"the CUDA kernels: {CUDA}")


def _op(name):
    return getattr(torch.ops.rcar_fast, name).default


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan(op, direction):
    img, cap, lens = _inputs()
    cap = cap.detach().nan_to_num(1.0).requires_grad_()   # opcheck compares every element
    torch.library.opcheck(_op(op), (img, cap, lens, *OPTIONS[direction]))


@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan_on_strided_inputs(op):
    """Feature tensors that are views (a slice of a longer batch, regions transposed in): the
    outputs and gradients keep the fakes' layout (contiguous)."""
    img, cap, lens = _inputs(R=5, L=6, grad=False)
    img = img.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    wide = torch.cat([cap.nan_to_num(1.0), torch.ones_like(cap)], dim=1)
    cap = wide[:, :cap.shape[1]].requires_grad_()
    assert not img.is_contiguous() and not cap.is_contiguous()
    torch.library.opcheck(_op(op), (img, cap, lens, *OPTIONS["i2t"]))


@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan_backward(op):
    img, cap, lens = _inputs(grad=False)
    cap = cap.nan_to_num(1.0)
    grad = torch.randn(img.shape[0], cap.shape[0], dtype=F64)
    torch.library.opcheck(_op(f"{op}_backward"), (grad, img, cap, lens, *OPTIONS["t2i"]))


def test_opcheck_rcar_reference_backward():
    img, cap, lens = _inputs(n_img=2, n_cap=3, grad=False)
    cap = cap.nan_to_num(1.0)
    head = _head("coop_rcar").train()
    weights = [p.detach().clone() for p in head.parameters()]
    grad = torch.randn(2, 3, dtype=F64)
    torch.library.opcheck(_op("rcar_reference_backward"),
                          (grad, img, cap, lens, weights, torch.tensor(4), head.regulator, head.steps,
                           head.direction, float(head.smooth), head.embed_dim, head.sim_dim, True))


@pytest.mark.parametrize("regulator", ["coop_rcar", "only_rcr"])
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_rcar_reference(regulator, training):
    img, cap, lens = _inputs(n_img=2, n_cap=3)
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = _head(regulator).train(training)
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]
    seed = torch.tensor(11)
    args = (img, cap, lens, weights, seed, head.regulator, head.steps, head.direction,
            float(head.smooth), head.embed_dim, head.sim_dim, training)
    torch.library.opcheck(rcar_ops.rcar_reference_op, args)


@needs_native
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_rcar_cpu(training):
    img, cap, lens = _inputs(dtype=torch.float64)
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = _head("coop_rcar", steps=2).train(training)
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]
    args = (img, cap, lens, weights, torch.tensor(11), *rcar_ops.op_config(head))
    torch.library.opcheck(rcar_ops.rcar_cpu_op, args)


FORWARD_ONLY_CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


def _rcar_op_args(head, img, cap, lens, weights, seed=0):
    return (img, cap, lens, weights, torch.tensor(seed), *rcar_ops.op_config(head))


@requires_interpreter
@triton_on_cpu
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_opcheck_rcar_triton(direction):
    """The fused Triton forward and its recomputing backward op (only_rcr: no dropout, so the
    head may train on it), tiny shapes for the interpreter."""
    img, cap, lens = _inputs(n_img=2, n_cap=2, R=3, L=4, d=8, dtype=torch.float32)
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    torch.manual_seed(3)
    head = rcar_fast.RCARSimilarity(embed_dim=8, sim_dim=6, regulator="only_rcr", steps=1,
                                    direction=direction).train()
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]
    args = _rcar_op_args(head, img, cap, lens, weights)
    torch.library.opcheck(rcar_ops.rcar_triton_op, args)
    grad = torch.randn(2, 2)
    torch.library.opcheck(_op("rcar_triton_backward"),
                          (grad,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3])
                          + ([w.detach() for w in weights],) + args[4:])


@requires_gpu
@needs_cuda_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["scan_cuda", "scan_cuda_backward"])
def test_opcheck_scan_cuda(op, dtype, direction):
    img, cap, lens = _inputs(n_img=3, n_cap=4, R=5, L=6, d=16, dtype=dtype, grad=False)
    img, cap, lens = img.cuda(), cap.nan_to_num(1.0).cuda(), lens.cuda()
    if op == "scan_cuda":
        args = (img.requires_grad_(), cap.requires_grad_(), lens)
    else:
        args = (torch.randn(3, 4, device="cuda"), img, cap, lens)
    torch.library.opcheck(_op(op), args + OPTIONS[direction])


assert scan_ops.scan_cuda_op


@requires_gpu
@needs_cuda_kernels
@pytest.mark.parametrize("regulator", ["only_rar", "coop_rcar"])
def test_opcheck_rcar_cuda_forward_only(regulator):
    img, cap, lens = _inputs(n_img=2, n_cap=3, dtype=torch.float32, grad=False)
    img, cap, lens = img.cuda(), cap.nan_to_num(1.0).cuda(), lens.cuda()
    head = _head(regulator).float().cuda().eval()
    weights = [p.detach() for p in head.parameters()]
    torch.library.opcheck(rcar_ops.rcar_cuda_op, _rcar_op_args(head, img, cap, lens, weights),
                          test_utils=FORWARD_ONLY_CHECKS)


@pytest.mark.parametrize("regulator", contract.REGULATORS)
def test_rcar_ops_see_the_heads_weights(regulator):
    """An RCAR op gets the head as tensors (weights in head.parameters() order) and a config;
    the head it rebuilds from them hands each kernel the same weights as the module itself:
    the CUDA kernel's pointer table, the Triton kernel's packed weights."""
    head = rcar_fast.RCARSimilarity(embed_dim=8, sim_dim=6, regulator=regulator, steps=2)
    weights = [p.detach().clone() for p in head.parameters()]
    config = rcar_ops.op_config(head)
    rebuilt = rcar_ops.with_weights(config, weights, rcar_ops.weight_tensors)
    assert len(rebuilt) == len(rcar_ops.weight_tensors(head))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, rcar_ops.weight_tensors(head)))
    if TRITON is None:
        packed = rcar_ops.with_weights(config, weights, rcar_ops.pack_weights, torch.float32, True)
        direct = rcar_ops.pack_weights(head, torch.float32, True)
        assert packed.keys() == direct.keys()
        assert all(torch.equal(packed[k], direct[k]) for k in direct)


def test_rcar_reference_backward_redraws_the_forwards_dropout_masks():
    """With dropout active, the op's backward recomputes the forward under the same seed: the
    gradient is that of the function the forward computed (gradcheck would fail otherwise)."""
    img, cap, lens = _inputs(n_img=2, n_cap=2, R=3, L=4, d=4)
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = _head("only_rar", 1, d=4).train()
    assert head.active_dropout()
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]

    def scores(img, cap, *some_weights):  # the first weights varied, the others fixed
        return rcar_ops.rcar_reference_op(
            img, cap, lens, list(some_weights) + weights[len(some_weights):], torch.tensor(5), head.regulator, head.steps,
            head.direction, float(head.smooth), head.embed_dim, head.sim_dim, True)

    first, again = scores(img, cap, *weights), scores(img, cap, *weights)
    assert torch.equal(first, again)   # the seed fixes the masks
    other = rcar_ops.rcar_reference_op(
        img, cap, lens, weights, torch.tensor(6), head.regulator, head.steps, head.direction,
        float(head.smooth), head.embed_dim, head.sim_dim, True)
    assert not torch.equal(first, other)  # and a different seed draws different ones
    assert torch.autograd.gradcheck(scores, (img, cap, *weights[:2]), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The pair-list ops (score_pairs under torch.compile)
# ---------------------------------------------------------------------------------------------

PAIRS = (torch.tensor([0, 3, 1, 1, 2]), torch.tensor([2, 0, 1, 1, 3]))   # a repeat included


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("op", [pytest.param("scan_pairs_reference", id="reference"),
                                pytest.param("scan_pairs_cpu", id="cpu", marks=needs_native)])
def test_opcheck_scan_pairs(op, direction):
    img, cap, lens = _inputs()
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    torch.library.opcheck(_op(op), (img, cap, lens, *PAIRS, *OPTIONS[direction]))
    grad = torch.randn(PAIRS[0].shape[0], dtype=F64)
    torch.library.opcheck(_op(f"{op}_backward"),
                          (grad, img.detach(), cap.detach(), lens, *PAIRS, *OPTIONS[direction]))


@pytest.mark.parametrize("regulator", ["only_rcr", "coop_rcar"])
def test_opcheck_rcar_pairs_reference(regulator):
    img, cap, lens = _inputs()
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = _head(regulator).train()
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = _rcar_op_args(head, img, cap, lens, weights, seed=9)[4:]
    torch.library.opcheck(_op("rcar_pairs_reference"), (img, cap, lens, *PAIRS, weights, *config))
    grad = torch.randn(PAIRS[0].shape[0], dtype=F64)
    torch.library.opcheck(_op("rcar_pairs_reference_backward"),
                          (grad, img.detach(), cap.detach(), lens, *PAIRS, [w.detach() for w in weights],
                           *config))


# ---------------------------------------------------------------------------------------------
# torch.compile of a forward (the training steps: tests/test_compile_training.py)
# ---------------------------------------------------------------------------------------------

@needs_native
def test_compiled_scoring_on_the_forward_only_cpu_kernel():
    img, cap, lens = _inputs(dtype=torch.float32, grad=False)
    head = _head().float().eval()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda i, c, n: head(i, c, n), fullgraph=True, backend="aot_eager")
        assert_close_to_reference(compiled(img, cap, lens), head(img, cap, lens, backend="cpu"),
                                  dtype=torch.float32, what="compiled RCAR cpu scores")
