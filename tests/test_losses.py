"""Training losses (rcar_fast.losses) against direct loop definitions, and the example loop."""
import importlib.util
import math
import pathlib

import pytest
import torch

from rcar_fast.losses import info_nce_loss, vse_hinge_loss
from tests.tolerances import F64_SCALAR_CLOSED_FORM, F64_SCALAR_RELATIVE

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_scan.py"


def _hinge_by_loops(sims, margin, max_violation):
    """VSE++ ContrastiveLoss written one triplet at a time."""
    n = sims.shape[0]
    total = 0.0
    for i in range(n):  # image i, negative captions j (row i)
        terms = [max(0.0, margin + sims[i, j].item() - sims[i, i].item()) for j in range(n) if j != i]
        total += (max(terms) if max_violation else sum(terms)) if terms else 0.0
    for j in range(n):  # caption j, negative images i (column j)
        terms = [max(0.0, margin + sims[i, j].item() - sims[j, j].item()) for i in range(n) if i != j]
        total += (max(terms) if max_violation else sum(terms)) if terms else 0.0
    return total


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_hinge_matches_triplet_loops(batch, max_violation):
    sims = torch.rand(batch, batch, dtype=torch.float64)
    expected = _hinge_by_loops(sims, 0.2, max_violation)
    got = vse_hinge_loss(sims, max_violation=max_violation)
    assert math.isclose(got.item(), expected, rel_tol=F64_SCALAR_CLOSED_FORM.rtol, abs_tol=F64_SCALAR_CLOSED_FORM.atol)
    mean = vse_hinge_loss(sims, max_violation=max_violation, reduction="mean")
    assert math.isclose(mean.item(), expected / batch, rel_tol=F64_SCALAR_CLOSED_FORM.rtol, abs_tol=F64_SCALAR_CLOSED_FORM.atol)


def test_hinge_is_zero_when_positives_win_by_the_margin():
    sims = torch.full((4, 4), 0.1) + torch.eye(4) * 0.31
    assert vse_hinge_loss(sims).item() == 0.0
    sims = torch.full((4, 4), 0.1) + torch.eye(4) * 0.19
    assert vse_hinge_loss(sims).item() > 0.0


def test_hinge_hardest_negative_gets_the_gradient():
    sims = torch.tensor([[0.5, 0.45, 0.1],
                         [0.0, 0.5, 0.2],
                         [0.3, 0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    vse_hinge_loss(sims).backward()
    grad = sims.grad
    # row 0: hardest negative caption is column 1; column 0: hardest negative image is row 2
    assert grad[0, 1] > 0 and grad[0, 2] == 0
    assert grad[2, 0] > 0 and grad[1, 0] == 0
    # a positive is pushed up once per direction where its hinge is active
    assert grad[0, 0] < 0


def test_info_nce_matches_cross_entropy_definition():
    sims = torch.randn(5, 5, dtype=torch.float64)
    t = 0.07
    logits = sims / t
    rows = -(logits.diagonal() - torch.logsumexp(logits, dim=1)).mean()
    cols = -(logits.diagonal() - torch.logsumexp(logits, dim=0)).mean()
    got = info_nce_loss(sims, temperature=t)
    assert math.isclose(got.item(), ((rows + cols) / 2).item(), rel_tol=F64_SCALAR_RELATIVE.rtol, abs_tol=F64_SCALAR_RELATIVE.atol)


def test_losses_reject_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        vse_hinge_loss(torch.rand(3, 4))
    with pytest.raises(ValueError, match="square"):
        info_nce_loss(torch.rand(3))
    with pytest.raises(TypeError, match="floating"):
        vse_hinge_loss(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction"):
        vse_hinge_loss(torch.rand(2, 2), reduction="max")
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(torch.rand(2, 2), temperature=0.0)


def _example():
    spec = importlib.util.spec_from_file_location("train_scan_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss", ["vse", "infonce"])
def test_example_training_loop_runs(loss, capsys):
    losses = _example().main(["--backend", "reference", "--steps", "3", "--batch", "6",
                              "--images", "12", "--dim", "16", "--embed", "16",
                              "--regions", "4", "--max-len", "8", "--loss", loss])
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert "held-out" in capsys.readouterr().out


def test_example_training_loop_triton_backend(capsys):
    # the gradient flows through the Triton kernels (interpreter on CPU) into the model
    losses = _example().main(["--backend", "triton", "--steps", "1", "--batch", "4",
                              "--images", "4", "--dim", "16", "--embed", "16",
                              "--regions", "3", "--max-len", "6"])
    assert len(losses) == 1 and math.isfinite(losses[0])
