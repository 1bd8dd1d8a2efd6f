"""Numerics regression: the reference's outputs and gradients on fixed seeded inputs must not
change between commits without anyone noticing.

tests/data/reference_checksums.json stores, per setting (SCAN directions / raw norms /
aggregations, RCAR regulators / steps / directions), the float64 outputs of the loop reference
on inputs drawn from NumPy's PCG64 (platform-stable) with NaN in the caption padding, and
checksums of the gradients (the dot product with fixed random weights, and the norm). A
change larger than 1e-9 relative fails: float64 rounding differences between machines (BLAS
summation order) are ~1e-15, so only a real change of the computed function trips it.

After an intended change of the numerics, regenerate (and say why in the commit):

    python -m tests.test_numerics_regression --regenerate
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from rcar_fast import reference
from tests.tolerances import F64_REGRESSION, F64_REGRESSION_INPUTS, approx, assert_scaled_close

DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference_checksums.json")
RTOL = F64_REGRESSION.rtol
N_IMG, R, N_CAP, LMAX, D, SIM_DIM = 3, 5, 4, 6, 8, 6
LENS = [6, 2, 1, 4]

SCAN_CASES = {
    "scan_t2i_clipped_l2norm_mean": dict(direction="t2i", raw_norm="clipped_l2norm", agg="mean", smooth=9.0),
    "scan_t2i_clipped_l2norm_lse6": dict(direction="t2i", raw_norm="clipped_l2norm", agg="lse", smooth=9.0, lse_lambda=6.0),
    "scan_i2t_clipped_l2norm_mean": dict(direction="i2t", raw_norm="clipped_l2norm", agg="mean", smooth=4.0),
    "scan_i2t_clipped_l2norm_lse20": dict(direction="i2t", raw_norm="clipped_l2norm", agg="lse", smooth=4.0, lse_lambda=20.0),
    "scan_t2i_softmax_max": dict(direction="t2i", raw_norm="softmax", agg="max", smooth=5.0),
    "scan_i2t_clipped_l1norm_sum": dict(direction="i2t", raw_norm="clipped_l1norm", agg="sum", smooth=6.0),
    "scan_t2i_l2norm_mean": dict(direction="t2i", raw_norm="l2norm", agg="mean", smooth=9.0),
    "scan_i2t_no_norm_mean": dict(direction="i2t", raw_norm="no_norm", agg="mean", smooth=2.0),
}
RCAR_CASES = {
    "rcar_coop_rcar2_t2i": dict(regulator="coop_rcar", steps=2, direction="t2i", smooth=10.0),
    "rcar_coop_rcar3_i2t": dict(regulator="coop_rcar", steps=3, direction="i2t", smooth=3.0),
    "rcar_only_rar2_t2i": dict(regulator="only_rar", steps=2, direction="t2i", smooth=10.0),
    "rcar_only_rcr2_i2t": dict(regulator="only_rcr", steps=2, direction="i2t", smooth=3.0),
    "rcar_only_rcr0_t2i": dict(regulator="only_rcr", steps=0, direction="t2i", smooth=10.0),
}
CASES = sorted(SCAN_CASES) + sorted(RCAR_CASES)


def _rng(name: str, stream: int) -> np.random.Generator:
    # A seed per case name (stable: the bytes of the name), so adding a case changes no other.
    return np.random.Generator(np.random.PCG64([stream] + list(name.encode())))


def make_inputs(name: str):
    """Seeded float64 inputs, not normalised (the functions must not assume it), NaN padding."""
    rng = _rng(name, 0)
    img = torch.from_numpy(0.6 * rng.standard_normal((N_IMG, R, D)) + 0.1)
    cap = torch.from_numpy(0.6 * rng.standard_normal((N_CAP, LMAX, D)) + 0.1)
    lens = torch.tensor(LENS)
    for j, n_word in enumerate(LENS):
        cap[j, n_word:] = float("nan")
    return img, cap, lens


def make_head(name: str) -> reference.RCARHead:
    head = reference.RCARHead(embed_dim=D, sim_dim=SIM_DIM, **RCAR_CASES[name]).double().eval()
    rng = _rng(name, 1)
    with torch.no_grad():
        for _, param in sorted(head.named_parameters()):
            fan = sum(param.shape[-2:]) if param.dim() == 2 else param.shape[0] + 1
            bound = math.sqrt(6.0 / fan)
            param.copy_(torch.from_numpy(rng.uniform(-bound, bound, size=tuple(param.shape))))
    return head


def _real_words(lens) -> torch.Tensor:
    return torch.arange(LMAX)[None, :] < torch.as_tensor(lens)[:, None]


def compute(name: str, form: str = "loop") -> dict:
    """Outputs and gradient checksums of case `name` with the loop or vectorised reference."""
    img, cap, lens = make_inputs(name)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    head = make_head(name) if name in RCAR_CASES else None
    if head is None:
        fn = reference.scan_similarity_loop if form == "loop" else reference.scan_similarity_vectorized
        out = fn(img, cap, lens, **SCAN_CASES[name])
    else:
        out = head.forward_loop(img, cap, lens) if form == "loop" else head.forward_vectorized(img, cap, lens)
    rng = _rng(name, 2)
    weights = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    params = [] if head is None else [p for _, p in sorted(head.named_parameters())]
    # Some modes leave weights unused (only_rcr never reaches sim_eval_w): zero gradients.
    grads = torch.autograd.grad((out * weights).sum(), [img, cap] + params, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [img, cap] + params)]
    real = _real_words(lens)
    flat = {"img": grads[0].reshape(-1), "cap": grads[1][real].reshape(-1)}
    if params:
        flat["params"] = torch.cat([g.reshape(-1) for g in grads[2:]])
    checks = {}
    for key, g in flat.items():
        probe = torch.from_numpy(rng.standard_normal(g.numel()))
        checks[key] = {"dot": float((g * probe).sum()), "norm": float(g.norm()),
                       "probe_norm": float(probe.norm())}
    inputs_sum = float(img.detach().sum() + cap.detach()[real].sum())
    return {"out": [float(v) for v in out.detach().reshape(-1)], "shape": list(out.shape),
            "grad": checks, "inputs_sum": inputs_sum}


def _load():
    with open(DATA_PATH) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def stored():
    assert os.path.exists(DATA_PATH), (f"{DATA_PATH} is missing; create it with "
                                       "`python -m tests.test_numerics_regression --regenerate`")
    return _load()


def test_table_covers_every_case(stored):
    assert sorted(stored["cases"]) == sorted(CASES)


@pytest.mark.parametrize("form", ["loop", "vectorized"])
@pytest.mark.parametrize("name", CASES)
def test_reference_numerics_unchanged(stored, name, form):
    expected = stored["cases"][name]
    got = compute(name, form)
    assert got["inputs_sum"] == approx(expected["inputs_sum"], F64_REGRESSION_INPUTS), (
        "the seeded inputs changed (NumPy's generator?), not the reference: regenerate the table")
    assert got["shape"] == expected["shape"]
    assert_scaled_close(torch.tensor(got["out"], dtype=torch.float64),
                        torch.tensor(expected["out"], dtype=torch.float64), F64_REGRESSION,
                        what=f"{name} ({form}): outputs moved")
    for key, check in expected["grad"].items():
        mine = got["grad"][key]
        assert mine["norm"] == pytest.approx(check["norm"], rel=RTOL), f"{name} ({form}): |d {key}| changed"
        bound = RTOL * check["norm"] * check["probe_norm"] + 1e-300
        assert abs(mine["dot"] - check["dot"]) <= bound, f"{name} ({form}): d {key} checksum changed"


def test_the_check_detects_a_small_change(stored):
    # The tolerance must catch a real change: perturb smooth by 1e-6 and expect a failure.
    name = "scan_t2i_clipped_l2norm_mean"
    img, cap, lens = make_inputs(name)
    kwargs = dict(SCAN_CASES[name], smooth=SCAN_CASES[name]["smooth"] * (1 + 1e-6))
    out = reference.scan_similarity_loop(img, cap, lens, **kwargs).reshape(-1).tolist()
    expected = stored["cases"][name]["out"]
    worst = max(abs(a - b) for a, b in zip(out, expected))
    assert worst > RTOL * max(abs(v) for v in expected)


def regenerate() -> None:
    table = {"about": "float64 outputs and gradient checksums of the loop reference on seeded "
                      "inputs; see tests/test_numerics_regression.py",
             "torch": torch.__version__, "numpy": np.__version__,
             "cases": {name: compute(name, "loop") for name in CASES}}
    os.makedirs(os.path.dirname(DATA_PATH), exist_ok=True)
    with open(DATA_PATH, "w") as f:
        # repr-exact floats: json writes the shortest string that round-trips (17 digits max).
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {DATA_PATH} ({len(CASES)} cases)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        print("usage: python -m tests.test_numerics_regression --regenerate", file=sys.stderr)
        sys.exit(2)
    regenerate()
