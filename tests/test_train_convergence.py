"""Training with rcar_fast (Liger-style convergence tests): the example trainer
(rcar_fast.train) run from the same seed must give the same loss curve

* with the sparse hardest-negative loss (<= 3B pairs with autograd) and with the full B x B
  loss (float64, to rounding: they are the same loss and the same gradients);
* with every usable fused backend and with the reference (float32, within tolerance): the
  fused backend's forward and backward drive the training.
And training must actually train: the loss on a small fixed set goes down.

For an RCAR head, the sparse loss on the fused kernels (issue 15): the B x B selection on
each fused forward (RAR's dropout on or off) and the pair recompute on each fused pair
backward that trains here give the reference's curve; auto picks a fused forward and a pair
backend with a backward; a pair backend that cannot train is one line from the trainer.

Under triton's CPU interpreter (no GPU) a step of the tiny model takes seconds, so the
Triton curves are a few steps long there; on a GPU they run longer and larger.
"""
from typing import Optional

import numpy as np
import pytest
import torch

from rcar_fast import dispatch, scorers
from rcar_fast.train import TrainConfig, _parser, train
from tests.tolerances import F32_CONVERGENCE_CURVE, F64_CONVERGENCE_CURVE, assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TINY = dict(batch=6, feat_dim=16, dim=16, sim_dim=8, regions=6, min_len=2, max_len=6,
            train_images=24, eval_images=0, lr=5e-3, log_every=10**6, head_dropout=0.0)
GPU_SIZE = dict(batch=32, feat_dim=64, dim=64, sim_dim=32, regions=12, min_len=4, max_len=12,
                train_images=128, eval_images=0, lr=2e-3, log_every=10**6, head_dropout=0.0)
FUSED = ("cpu", "triton", "cuda")


def curve(**overrides) -> np.ndarray:
    cfg = TrainConfig(**{**TINY, **overrides})
    return np.array(train(cfg).losses)


@pytest.mark.parametrize("model", ["scan", "rcar"])
def test_sparse_loss_trains_exactly_like_the_full_loss(model):
    sparse = curve(model=model, loss="sparse", dtype="float64", steps=5, backend="reference")
    full = curve(model=model, loss="full", dtype="float64", steps=5, backend="reference")
    assert_close(sparse, full, F64_CONVERGENCE_CURVE)


@pytest.mark.parametrize("head", [n for n in scorers.names() if n not in ("scan", "rcar")])
def test_every_head_of_the_registry_trains_sparse_like_full(head):
    # --head takes every name of the registry; the scorer builds it (no weights here).
    assert _parser().parse_args(["--head", head]).model == head
    sparse = curve(model=head, loss="sparse", dtype="float64", steps=3, backend="reference")
    full = curve(model=head, loss="full", dtype="float64", steps=3, backend="reference")
    assert np.isfinite(sparse).all()
    assert_close(sparse, full, F64_CONVERGENCE_CURVE)


def test_trainer_refuses_an_unknown_head():
    with pytest.raises(ValueError, match="model \\(--head\\) must be one of"):
        curve(model="vse", steps=1)


def test_trainer_command_reports_a_bad_head_option_in_one_line(capsys):
    from rcar_fast.train import main

    assert main(["--head", "laps", "--direction", "t2i", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "preset='laps' sets direction='both'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model", ["scan", "rcar"])
def test_training_lowers_the_loss_on_a_fixed_set(model):
    # Six images, one batch: the model can fit them, so the loss must fall.
    losses = curve(model=model, steps=20, train_images=6, lr=1e-2)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses


def _has_backward(op: str, backend: str) -> bool:
    """Whether the backend can be differentiated. Forward-only kernels either return scores
    without autograd or raise on backward saying they have none."""
    from rcar_fast.modules import RCARSimilarity
    from rcar_fast.ops.scan import scan_similarity

    img = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    cap = torch.randn(2, 3, 8, device=DEVICE)
    lens = torch.tensor([3, 2])
    if op == "scan":
        out = scan_similarity(img, cap, lens, backend=backend)
    else:
        out = RCARSimilarity(embed_dim=8, sim_dim=4).to(DEVICE).eval()(img, cap, lens, backend=backend)
    if not out.requires_grad:
        return False
    try:
        out.sum().backward()
    except RuntimeError as err:
        if "no backward" in str(err):
            return False
        raise
    return True


@pytest.mark.parametrize("model", ["scan", "rcar"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_trains_like_the_reference(backend, model):
    reason = dispatch.rejection(model, backend, torch.device(DEVICE), torch.float32)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {model} on {DEVICE} float32 here: {reason}")
    interpreted = backend == "triton" and not ON_GPU
    size = dict(TINY) if not ON_GPU else dict(GPU_SIZE)
    steps = 3 if interpreted else 12
    common = dict(size, model=model, steps=steps, dtype="float32", device=DEVICE)
    reference_curve = curve(**common, backend="reference", loss="full")
    # The selection pass on the fused backend (forward only), pairs recomputed by the reference.
    assert_close(curve(**common, backend=backend, loss="sparse"), reference_curve, F32_CONVERGENCE_CURVE)
    if _has_backward(model, backend):
        # All B x B pairs through the fused forward and backward.
        assert_close(curve(**common, backend=backend, loss="full"), reference_curve, F32_CONVERGENCE_CURVE)


# ---------------------------------------------------------------------------------------------
# RCAR with the sparse loss on the fused kernels (issue 15): B x B selection without a graph on
# the fused forward, the <= 3B pairs with autograd on a pair backend with a backward
# ---------------------------------------------------------------------------------------------

def _usable_for_training(op: str, backend: str, dropout: Optional[float] = None) -> Optional[str]:
    """None if `backend` can run `op` for a training-mode RCAR head here (a backward; RAR's
    dropout at p = dropout, None: the official 0.4), else why not (the skip reason)."""
    from rcar_fast.modules import RcarScorer

    impl = dispatch.implementation(op, backend)
    if impl is None:
        return f"{backend} has no {op} backend"
    head, _ = RcarScorer.build("rcar", 8, dict(sim_dim=4, dropout=dropout))
    head = head.to(DEVICE).train()
    inputs = dispatch.Inputs.of_head(head, torch.zeros(2, 3, 8, device=DEVICE), torch.zeros(2, 3, 8, device=DEVICE))
    with torch.enable_grad():
        why = impl.not_supported_reasons(inputs)
    return "; ".join(why) or None


@pytest.mark.parametrize("backend", FUSED)
def test_rcar_sparse_loss_with_dropout_selects_on_the_fused_kernel_like_the_reference(backend):
    """RAR's dropout on (the official p = 0.4): the selection pass runs the head in eval mode
    (no random draws) on the fused forward, the pairs draw their masks on the reference in
    both runs, so the curves agree to rounding."""
    reason = dispatch.rejection("rcar", backend, torch.device(DEVICE), torch.float32)
    if reason is not None:
        pytest.skip(f"{backend} cannot run rcar on {DEVICE} float32 here: {reason}")
    size = dict(TINY) if not ON_GPU else dict(GPU_SIZE)
    steps = 3 if backend == "triton" and not ON_GPU else 10
    common = dict(size, model="rcar", steps=steps, dtype="float32", device=DEVICE,
                  head_dropout=None, loss="sparse", pair_backend="reference")
    fused = train(TrainConfig(**common, backend=backend))
    reference_run = train(TrainConfig(**common, backend="reference"))
    assert fused.backends == {"selection": backend, "pairs": "reference"}
    assert_close(np.array(fused.losses), np.array(reference_run.losses), F32_CONVERGENCE_CURVE)


@pytest.mark.parametrize("backend", FUSED)
def test_rcar_pairs_on_a_fused_backward_train_like_the_reference(backend):
    """The <= 3B pairs rescored with autograd on a fused pair backend (the C++ CPU or the
    Triton RCAR pair backward): the same curve as the reference pair recompute."""
    reason = _usable_for_training("rcar_pairs", backend, dropout=0.0)
    if reason is not None:
        pytest.skip(f"no fused RCAR pair backward on {backend} here: {reason}")
    size = dict(TINY) if not ON_GPU else dict(GPU_SIZE)
    steps = 10
    if backend == "triton" and not ON_GPU:
        # interpreted: ~1 s per pair backward, so 2 steps of B = 3 (<= 9 pairs each)
        size, steps = dict(size, batch=3), 2
    common = dict(size, model="rcar", steps=steps, dtype="float32", device=DEVICE, loss="sparse",
                  head_dropout=0.0, backend="reference")
    fused = train(TrainConfig(**common, pair_backend=backend))
    assert fused.backends["pairs"] == backend
    reference_curve = curve(**common, pair_backend="reference")
    assert_close(np.array(fused.losses), reference_curve, F32_CONVERGENCE_CURVE)


def test_rcar_sparse_training_under_auto_runs_the_fused_forward_and_a_pair_backward():
    """What auto chooses for a training RCAR head with the sparse loss: the first fused
    forward that takes the inputs for the selection, a pair backend with a backward (and
    dropout) for the recompute; and the loss falls."""
    result = train(TrainConfig(**{**TINY, "model": "rcar", "steps": 12, "train_images": 6,
                                  "lr": 1e-2, "head_dropout": None, "device": DEVICE}))
    order = dispatch.auto_order("rcar", DEVICE)
    expected = next(be for be in order
                    if dispatch.rejection("rcar", be, torch.device(DEVICE), torch.float32) is None)
    assert result.backends["selection"] == expected
    pair_impl = dispatch.implementation("rcar_pairs", result.backends["pairs"])
    assert pair_impl.has_backward and pair_impl.implements_dropout
    losses = np.array(result.losses)
    assert np.isfinite(losses).all() and losses[-4:].mean() < losses[:4].mean(), losses


def test_trainer_refuses_a_pair_backend_that_cannot_train_in_one_line(capsys):
    from rcar_fast.train import run_or_complain

    if _usable_for_training("rcar_pairs", "cpu") is None:
        # It trains: refuse it on a dtype the C++ kernels do not take instead.
        cfg = TrainConfig(**{**TINY, "model": "rcar", "steps": 1, "pair_backend": "cpu",
                             "dtype": "float16"})
        expected = "float32 or float64"
    else:
        cfg = TrainConfig(**{**TINY, "model": "rcar", "steps": 1, "head_dropout": None,
                             "pair_backend": "cpu"})
        expected = "backward pass is needed"
    assert run_or_complain(cfg, prog="train") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train: error: backend 'cpu' cannot run rcar_pairs") and "\n" not in err
    assert expected in err
