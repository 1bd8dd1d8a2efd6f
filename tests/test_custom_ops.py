"""The ops as torch.library custom ops: torch.library.opcheck for every op that runs here, and a
SCAN and an RCAR training step compiled with torch.compile(fullgraph=True) giving the eager
step's loss and gradients."""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.losses import vse_hinge_loss
from rcar_fast.ops import rcar_cpu, rcar_reference, scan_cpu, scan_reference, scan_triton
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
needs_interpreter = pytest.mark.skipif(TRITON is not None, reason=f"triton on CPU tensors: {TRITON}")
SCAN_OPS = [pytest.param("scan_reference", id="reference"),
            pytest.param("scan_cpu", id="cpu", marks=needs_native),
            pytest.param("scan_triton", id="triton", marks=needs_interpreter)]
assert scan_reference.scan_reference_op and scan_cpu.scan_cpu_op and scan_triton.scan_triton_op


def _op(name):
    return getattr(torch.ops.rcar_fast, name).default


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan(op, direction):
    img, cap, lens = _inputs()
    cap = cap.detach().nan_to_num(1.0).requires_grad_()   # opcheck compares every element
    torch.library.opcheck(_op(op), (img, cap, lens, *OPTIONS[direction]))


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
    torch.library.opcheck(rcar_reference.rcar_reference_op, args)


@needs_native
def test_opcheck_rcar_cpu_forward_only():
    img, cap, lens = _inputs(dtype=torch.float32, grad=False)
    cap = cap.nan_to_num(1.0)
    head = _head().float().eval()
    args = (img, cap, lens, rcar_cpu.flat_weights(head), head.direction, head.regulator,
            head.steps, float(head.smooth))
    # a forward-only op: no autograd registration to check
    torch.library.opcheck(rcar_cpu.rcar_cpu_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_rcar_reference_backward_redraws_the_forwards_dropout_masks():
    """With dropout active, the op's backward recomputes the forward under the same seed: the
    gradient is that of the function the forward computed (gradcheck would fail otherwise)."""
    img, cap, lens = _inputs(n_img=2, n_cap=2, R=3, L=4, d=4)
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = _head("only_rar", 1, d=4).train()
    assert head.active_dropout()
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]

    def scores(img, cap, *some_weights):  # the first weights varied, the others fixed
        return rcar_reference.rcar_reference_op(
            img, cap, lens, list(some_weights) + weights[len(some_weights):], torch.tensor(5), head.regulator, head.steps,
            head.direction, float(head.smooth), head.embed_dim, head.sim_dim, True)

    first, again = scores(img, cap, *weights), scores(img, cap, *weights)
    assert torch.equal(first, again)   # the seed fixes the masks
    other = rcar_reference.rcar_reference_op(
        img, cap, lens, weights, torch.tensor(6), head.regulator, head.steps, head.direction,
        float(head.smooth), head.embed_dim, head.sim_dim, True)
    assert not torch.equal(first, other)  # and a different seed draws different ones
    assert torch.autograd.gradcheck(scores, (img, cap, *weights[:2]), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a training step
# ---------------------------------------------------------------------------------------------

def _grads_of(loss_fn, tensors, *args):
    for t in tensors:
        t.grad = None
    loss = loss_fn(*args)
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


def _compiled_matches_eager(loss_fn, tensors, *args):
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = _grads_of(compiled, tensors, *args)
    loss_e, grads_e = _grads_of(loss_fn, tensors, *args)
    assert_close_to_reference(loss_c, loss_e, dtype=F64, what="compiled loss")
    for got, want in zip(grads_c, grads_e):
        assert_close_to_reference(got, want, dtype=F64, what="compiled gradient")


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=needs_native), "reference",
                                     pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scan_training_step_compiles_fullgraph(backend, direction):
    img, cap, lens = _inputs(R=3, L=4, d=4) if backend == "triton" else _inputs()
    kw = dict(zip(("direction", "raw_norm", "smooth", "agg", "lse_lambda"), OPTIONS[direction]))
    torch._dynamo.reset()

    def loss_fn(img, cap, lens):
        sims = rcar_fast.scan_similarity(img, cap, lens, backend=backend, **kw)
        return vse_hinge_loss(sims, 0.2, max_violation=True)

    _compiled_matches_eager(loss_fn, [img, cap], img, cap, lens)


@pytest.mark.parametrize("regulator", ["only_rcr", "coop_rcar"])
def test_rcar_training_step_compiles_fullgraph(regulator):
    """A head in training mode (auto: the reference, the CPU kernel being forward-only). With
    RAR dropout active the compiled and eager steps draw different masks, so that case is
    compared in eval mode, and in training mode only checked to train (finite, non-zero)."""
    img, cap, lens = _inputs(n_img=3, n_cap=3)
    head = _head(regulator).train()
    torch._dynamo.reset()

    def loss_fn(img, cap, lens):
        return vse_hinge_loss(head(img, cap, lens), 0.2, max_violation=True)

    tensors = [img, cap, *head.parameters()]
    if not head.active_dropout():
        _compiled_matches_eager(loss_fn, [img, cap, head.rcr_modules[0].rcr_matrix_w[0].weight],
                                img, cap, lens)
        return
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss, grads = _grads_of(compiled, [img, cap, head.sim_eval_w.weight], img, cap, lens)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    del tensors
    head.eval()
    torch._dynamo.reset()

    def eval_loss_fn(img, cap, lens):
        return vse_hinge_loss(head(img, cap, lens, backend="reference"), 0.2, max_violation=True)

    _compiled_matches_eager(eval_loss_fn, [img, cap, head.sim_eval_w.weight], img, cap, lens)


@needs_native
def test_compiled_scoring_on_the_forward_only_cpu_kernel():
    img, cap, lens = _inputs(dtype=torch.float32, grad=False)
    head = _head().float().eval()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda i, c, n: head(i, c, n), fullgraph=True, backend="aot_eager")
        assert_close_to_reference(compiled(img, cap, lens), head(img, cap, lens, backend="cpu"),
                                  dtype=torch.float32, what="compiled RCAR cpu scores")


def test_eager_calls_still_validate_lens():
    img, cap, lens = _inputs()
    with pytest.raises(ValueError, match="lens must lie in"):
        rcar_fast.scan_similarity(img, cap, lens + cap.shape[1])
