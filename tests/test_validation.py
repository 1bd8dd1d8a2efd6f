"""Every public entry point rejects bad input before any compute, naming the argument."""
import numpy as np
import pytest
import torch

import rcar_fast


def _good(dtype=torch.float32):
    return torch.randn(2, 3, 4, dtype=dtype), torch.randn(3, 5, 4, dtype=dtype), torch.tensor([5, 1, 3])


def _entry_points():
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=4, steps=1).eval()
    return {
        "scan": lambda img, cap, lens: rcar_fast.scan_similarity(img, cap, lens),
        "rcar": lambda img, cap, lens: head(img, cap, lens),
    }


def _cases():
    img, cap, lens = _good()
    nan_img = img.clone()
    nan_img[1, 2, 0] = float("nan")
    inf_cap = cap.clone()
    inf_cap[2, 1, 3] = float("inf")  # position 1 < lens[2] = 3: a real word
    return [
        ("img rank", (img[0], cap, lens), ValueError, r"img must have shape \(n_img, R, d\)"),
        ("cap rank", (img, cap[..., None], lens), ValueError, r"cap must have shape \(n_cap, Lmax, d\)"),
        ("img not tensor", (img.numpy(), cap, lens), TypeError, "img must be a torch.Tensor"),
        ("int img", (img.long(), cap.long(), lens), TypeError, "img must be float16, bfloat16, float32 or float64"),
        ("d mismatch", (img[..., :3], cap, lens), ValueError, "share the feature size d"),
        ("dtype mismatch", (img.double(), cap, lens), TypeError, "same dtype"),
        ("empty img", (img[:0], cap, lens), ValueError, "img must be non-empty"),
        ("empty cap", (img, cap[:0], lens[:0]), ValueError, "cap must be non-empty"),
        ("lens zero", (img, cap, torch.tensor([5, 0, 3])), ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("lens too long", (img, cap, torch.tensor([6, 1, 3])), ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("lens float", (img, cap, torch.tensor([5.0, 1.0, 3.0])), TypeError, "lens must be an integer tensor"),
        ("lens float list", (img, cap, [5.0, 1.0, 3.0]), TypeError, "lens must hold integers"),
        ("lens wrong count", (img, cap, torch.tensor([5, 1])), ValueError, r"lens must have shape \(n_cap,\) = \(3,\)"),
        ("lens 2-d", (img, cap, lens[None]), ValueError, "lens must have shape"),
        ("NaN img", (nan_img, cap, lens), ValueError, "img holds NaN or Inf"),
        ("Inf in real word", (img, inf_cap, lens), ValueError, "cap holds NaN or Inf at real word positions"),
    ]


@pytest.mark.parametrize("entry", ["scan", "rcar"])
@pytest.mark.parametrize("name,args,exc,pattern", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_raises_naming_the_argument(entry, name, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _entry_points()[entry](*args)


@pytest.mark.parametrize("entry", ["scan", "rcar"])
def test_lens_forms_accepted_and_nan_padding_allowed(entry):
    img, cap, lens = _good()
    cap[1, 1:] = float("nan")  # lens[1] = 1: everything after word 0 is padding
    fn = _entry_points()[entry]
    ref = fn(img, cap, lens)
    assert bool(torch.isfinite(ref).all())
    for form in ([5, 1, 3], np.array([5, 1, 3], dtype=np.int32), lens.int()):
        torch.testing.assert_close(fn(img, cap, form), ref)


def test_scan_option_errors():
    img, cap, lens = _good()
    for kwargs, pattern in [
        (dict(direction="x2y"), "direction must be one of"),
        (dict(raw_norm="l3norm"), "raw_norm must be one of"),
        (dict(agg="median"), "agg must be one of"),
        (dict(smooth=0.0), "smooth must be a positive finite number"),
        (dict(lse_lambda=float("nan")), "lse_lambda must be a positive finite number"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            rcar_fast.scan_similarity(img, cap, lens, **kwargs)


def test_rcar_embed_dim_mismatch():
    head = rcar_fast.RCARSimilarity(embed_dim=8, sim_dim=4, steps=1)
    img, cap, lens = _good()
    with pytest.raises(ValueError, match="embed_dim = 8"):
        head(img, cap, lens)


def test_finite_check_walks_blocks_and_sees_every_block(monkeypatch):
    """The NaN/Inf check runs blockwise (bounded temporaries): a bad value in any block is
    found, padding in any block is ignored."""
    from rcar_fast import validate

    monkeypatch.setattr(validate, "FINITE_CHECK_BLOCK_BYTES", 2 * 4 * 3 * 4)   # 2 captions per block
    img = torch.randn(5, 3, 4)
    cap = torch.randn(7, 4, 4)
    lens = torch.tensor([4, 1, 2, 3, 4, 1, 2])
    cap[torch.arange(4)[None, :] >= lens[:, None]] = float("nan")
    assert validate.similarity_inputs(img, cap, lens) is not None
    for j, pos in ((0, 3), (5, 0), (6, 1)):     # first, middle and last (partial) block
        bad = cap.clone()
        bad[j, pos, 2] = float("inf")
        with pytest.raises(ValueError, match="cap holds NaN or Inf"):
            validate.similarity_inputs(img, bad, lens)
    bad_img = img.clone()
    bad_img[4, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="img holds NaN or Inf"):
        validate.similarity_inputs(bad_img, cap, lens)
