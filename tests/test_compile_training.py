"""A training step compiled with torch.compile(fullgraph=True) gives the eager step's loss and
gradients: SCAN (all pairs and the hardest-negative pair recompute) and the RCAR head in
training mode, on every backend that runs here (reference, the C++ CPU kernels, Triton in its
CPU interpreter; the CUDA backends in the `gpu` tests).

fullgraph=True makes any graph break an error, so these tests also show that the public entry
points (scan_similarity, RCARSimilarity.forward, score_pairs, hardest_negative_loss) trace into
one graph: the kernels are custom ops (rcar_fast.ops.library), and the checks that read the
data (lens and pair indices in range, NaN/Inf in the features or in the selection scores) run
in eager calls only: a compiled step trusts inputs its caller validated. The eager refusals
are checked at the end.

backend="aot_eager": the graph is traced and differentiated as under the default backend
(inductor), but the aten ops run eagerly: seconds instead of a C++ compile per graph.
"""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.losses import hardest_negative_loss, vse_hinge_loss
from rcar_fast.ops import rcar as rcar_ops
from rcar_fast.pairs import score_pairs
from tests.conftest import requires_gpu, requires_interpreter
from tests.inputs import make_inputs
from tests.tolerances import assert_close_to_reference

F64, F32 = torch.float64, torch.float32
CPU = torch.device("cpu")
NATIVE = dispatch.rejection("scan", "cpu", CPU, F64)
TRITON = dispatch.rejection("scan", "triton", CPU, F64)
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"the C++ CPU kernels: {NATIVE}")
# Triton on CPU tensors runs in its interpreter (tests marked `interpreter`, see conftest.py).
triton_on_cpu = pytest.mark.skipif(TRITON is not None, reason=f"triton on CPU tensors: {TRITON}")
needs_interpreter = [requires_interpreter, triton_on_cpu]
SCAN_SETTINGS = {"t2i": dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean"),
                 "i2t": dict(direction="i2t", raw_norm="l2norm", smooth=4.0, agg="lse", lse_lambda=5.0)}


# ---------------------------------------------------------------------------------------------
# One training step, eager and compiled
# ---------------------------------------------------------------------------------------------

def _batch(B=4, R=5, L=6, d=8, dtype=F64, device="cpu"):
    """Raw features of a batch (random values in the caption padding, which every backend must
    ignore) and a projection whose weights the step trains."""
    img, cap, lens = make_inputs(B, B, R, d, L, dtype=dtype, device=device, pad=None, seed=11)
    torch.manual_seed(5)
    proj = torch.nn.Linear(d, d).to(device=device, dtype=dtype)
    return img, cap, lens, proj


def _step(loss_fn, params, args):
    """Loss and the gradients of params after loss.backward() (params' .grad cleared first)."""
    for p in params:
        p.grad = None
    loss = loss_fn(*args)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def assert_compiled_step_matches(loss_fn, params, args, *, eager_fn=None, seed=None, dtype=F64):
    """torch.compile(loss_fn, fullgraph=True) and eager_fn (default loss_fn) give the same
    loss and gradients; seed: both run from this RNG state (dropout)."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    if seed is not None:
        torch.manual_seed(seed)
    loss_c, grads_c = _step(compiled, params, args)
    if seed is not None:
        torch.manual_seed(seed)
    loss_e, grads_e = _step(eager_fn or loss_fn, params, args)
    assert torch.isfinite(loss_e) and loss_e > 0, f"a step that trains nothing: loss {loss_e}"
    assert_close_to_reference(loss_c, loss_e.to(loss_c.dtype), dtype=dtype, what="compiled loss")
    assert any(g is not None and g.abs().sum() > 0 for g in grads_e), "no gradient: nothing checked"
    for i, (got, want) in enumerate(zip(grads_c, grads_e)):
        if got is None or want is None:
            # A parameter the loss does not depend on (sim_eval_w of only_rcr): eager autograd
            # leaves its .grad None, an op's backward gives zeros.
            other = want if got is None else got
            assert other is None or not other.any(), f"gradient {i}: compiled {got}, eager {want}"
            continue
        assert_close_to_reference(got, want, dtype=dtype, what=f"compiled gradient {i}")


# ---------------------------------------------------------------------------------------------
# SCAN
# ---------------------------------------------------------------------------------------------

SCAN_BACKENDS = [pytest.param("cpu", marks=needs_native), "reference",
                 pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_scan_training_step(backend, direction):
    img, cap, lens, proj = _batch(R=3, L=4, d=4) if backend == "triton" else _batch()

    def loss_fn(img, cap, lens):
        sims = rcar_fast.scan_similarity(proj(img), proj(cap), lens, backend=backend,
                                         **SCAN_SETTINGS[direction])
        return vse_hinge_loss(sims, 0.2, max_violation=True)

    assert_compiled_step_matches(loss_fn, list(proj.parameters()), (img, cap, lens))


@pytest.mark.parametrize("pair_backend", [pytest.param("cpu", marks=needs_native), "reference"])
def test_scan_hardest_negative_step(pair_backend):
    """The no-grad all-pairs selection, the hardest pairs picked in the graph, and the pair
    recompute (score_pairs) with autograd: one graph."""
    img, cap, lens, proj = _batch(B=5)

    def loss_fn(img, cap, lens):
        return hardest_negative_loss(proj(img), proj(cap), lens, backend="auto",
                                     pair_backend=pair_backend, **SCAN_SETTINGS["t2i"])

    assert_compiled_step_matches(loss_fn, list(proj.parameters()), (img, cap, lens))


def test_score_pairs_step_with_repeated_pairs():
    img, cap, lens, proj = _batch()
    img_idx, cap_idx = torch.tensor([0, 1, 1, 3, 0]), torch.tensor([2, 1, 1, 0, 2])

    def loss_fn(img, cap, lens):
        scores = score_pairs(proj(img), proj(cap), lens, img_idx, cap_idx, backend="reference",
                             **SCAN_SETTINGS["i2t"])
        return (scores * torch.arange(1.0, 6.0, dtype=scores.dtype)).sum()

    assert_compiled_step_matches(loss_fn, list(proj.parameters()), (img, cap, lens))


# ---------------------------------------------------------------------------------------------
# RCAR: the head in training mode
# ---------------------------------------------------------------------------------------------

def _head(regulator, d=8, dtype=F64, direction="t2i"):
    torch.manual_seed(3)
    head = rcar_fast.RCARSimilarity(embed_dim=d, sim_dim=6, regulator=regulator, steps=1,
                                    direction=direction)
    return head.to(dtype).train()


def _rcar_params(head, img):
    return [img, *head.parameters()]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator", ["only_rcr", "coop_rcar"])
def test_rcar_training_step_reference(regulator, direction):
    """only_rcr has no dropout: the compiled step equals the plain eager one. coop_rcar's RAR
    dropout draws its masks from a seed drawn in the graph, so the eager step it is compared
    with runs the same op from the same RNG state (the op's backward redraws the forward's
    masks: tests/test_custom_ops.py)."""
    img, cap, lens, _ = _batch(B=3)
    img.requires_grad_()
    head = _head(regulator, direction=direction)

    def loss_fn(img, cap, lens):
        return vse_hinge_loss(head(img, cap, lens, backend="reference"), 0.2)

    eager_fn = None
    if head.active_dropout():
        def eager_fn(img, cap, lens):
            scores = rcar_ops.compiled_call(rcar_ops.rcar_reference_op, head, img, cap, lens)
            return vse_hinge_loss(scores, 0.2)

    assert_compiled_step_matches(loss_fn, _rcar_params(head, img), (img, cap, lens),
                                 eager_fn=eager_fn, seed=17)


@needs_native
@pytest.mark.parametrize("pair_backend", ["reference", "cpu"])
def test_rcar_hardest_negative_step_selects_on_the_cpu_kernel(pair_backend):
    """The C++ RCAR kernel's no-grad selection pass (run in eval mode); the 3B pairs are
    recomputed on the reference with autograd, or (cpu: the head has no dropout) take the
    selection's scores with the pair kernel's backward (rcar_pairs_cpu_given)."""
    img, cap, lens, _ = _batch(B=4)
    img.requires_grad_()
    head = _head("only_rcr")

    def loss_fn(img, cap, lens):
        return hardest_negative_loss(img, cap, lens, model=head, backend="cpu",
                                     pair_backend=pair_backend)

    assert_compiled_step_matches(loss_fn, _rcar_params(head, img), (img, cap, lens))
    assert head.training


@needs_native
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator", ["only_rcr", "coop_rcar"])
def test_rcar_training_step_cpu(regulator, direction):
    """The C++ CPU kernel's fused backward, compiled as one op: its seed (RAR's counter-based
    dropout) is drawn the same way in eager and compiled calls, so both take the same step."""
    img, cap, lens, _ = _batch(B=3)
    img.requires_grad_()
    head = _head(regulator, direction=direction)

    def loss_fn(img, cap, lens):
        return vse_hinge_loss(head(img, cap, lens, backend="cpu"), 0.2)

    assert_compiled_step_matches(loss_fn, _rcar_params(head, img), (img, cap, lens), seed=17)


@requires_interpreter
@triton_on_cpu
def test_rcar_training_step_triton():
    """only_rcr trains on the fused Triton forward (its backward recomputes the reference)."""
    img, cap, lens, _ = _batch(B=2, R=3, L=4, dtype=F32)
    img.requires_grad_()
    head = _head("only_rcr", dtype=F32)

    def loss_fn(img, cap, lens):
        return vse_hinge_loss(head(img, cap, lens, backend="triton"), 0.5)

    assert_compiled_step_matches(loss_fn, _rcar_params(head, img), (img, cap, lens), dtype=F32)


# ---------------------------------------------------------------------------------------------
# The CUDA GPU backends
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_scan_training_step(backend):
    img, cap, lens, proj = _batch(B=6, R=7, L=9, d=32, dtype=F32, device="cuda")

    def loss_fn(img, cap, lens):
        sims = rcar_fast.scan_similarity(proj(img), proj(cap), lens, backend=backend,
                                         **SCAN_SETTINGS["t2i"])
        return vse_hinge_loss(sims, 0.2)

    assert_compiled_step_matches(loss_fn, list(proj.parameters()), (img, cap, lens), dtype=F32)


@requires_gpu
def test_gpu_rcar_training_step_triton_and_cuda_selection():
    img, cap, lens, _ = _batch(B=4, R=7, L=9, d=32, dtype=F32, device="cuda")
    img.requires_grad_()
    head = _head("only_rcr", d=32, dtype=F32).cuda()

    def loss_fn(img, cap, lens):
        return (vse_hinge_loss(head(img, cap, lens, backend="triton"), 0.2)
                + hardest_negative_loss(img, cap, lens, model=head, backend="cuda",
                                        pair_backend="reference"))

    assert_compiled_step_matches(loss_fn, _rcar_params(head, img), (img, cap, lens), dtype=F32)


# ---------------------------------------------------------------------------------------------
# What a compiled step skips, an eager call still refuses
# ---------------------------------------------------------------------------------------------

def test_eager_calls_still_check_the_data():
    img, cap, lens, _ = _batch()
    too_long = lens.clone()
    too_long[1] = cap.shape[1] + 1
    with pytest.raises(ValueError, match="lens must lie in"):
        rcar_fast.scan_similarity(img, cap, too_long)
    with pytest.raises(ValueError, match="lens must lie in"):
        hardest_negative_loss(img, cap, too_long)
    with pytest.raises(ValueError, match="img_idx values must lie in"):
        score_pairs(img, cap, lens, torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        hardest_negative_loss(img, cap, lens, score_fn=lambda i, c, n: torch.full((4, 4), float("nan")))
    nan_img = img.clone()
    nan_img[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="img holds NaN"):
        hardest_negative_loss(nan_img, cap, lens)
