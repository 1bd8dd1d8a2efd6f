"""Every public entry point rejects bad input before any compute, naming the argument."""
import numpy as np
import pytest
import torch

import rcar_fast
from tests.inputs import make_inputs
from tests.tolerances import SAME_CALL_OTHER_ARGUMENT_FORM, assert_close


def _good(dtype=torch.float32):
    # padding left as drawn (finite): each test poisons exactly what it checks
    return make_inputs(2, 3, 3, 4, lens=[5, 1, 3], dtype=dtype, pad=None)


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
        assert_close(fn(img, cap, form), ref, SAME_CALL_OTHER_ARGUMENT_FORM)


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
    img, cap, lens = make_inputs(5, 7, 3, 4, lens=[4, 1, 2, 3, 4, 1, 2], dtype=torch.float32)
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


# ---------------------------------------------------------------------------------------------
# lens and number arguments: one clear error naming the argument (issue 12)
# ---------------------------------------------------------------------------------------------

def _lens_cases():
    return [
        ("None", None, TypeError, "lens must be a sequence, NumPy array or integer tensor of the 3"),
        ("int", 3, TypeError, "lens must be a sequence"),
        ("str", "513", TypeError, "lens must be a sequence"),
        ("bool list", [True, True, False], TypeError, "lens must hold integers"),
        ("bool tensor", torch.tensor([True, True, True]), TypeError, "lens must be an integer tensor"),
        ("bool array", np.array([True, True, True]), TypeError, "lens must be an integer array"),
        ("fractional array", np.array([5.0, 1.5, 3.0]), TypeError, "lens must be an integer array"),
        ("complex tensor", torch.tensor([5, 1, 3], dtype=torch.complex64), TypeError,
         "lens must be an integer tensor"),
        ("complex array", np.array([5, 1, 3], dtype=np.complex128), TypeError, "lens must be an integer array"),
        ("complex list", [5 + 0j, 1, 3], TypeError, "lens must hold integers"),
        ("object array", np.array([5, 1, None], dtype=object), TypeError, "lens must be an integer array"),
        ("nested list", [[5, 1, 3]], TypeError, "lens must hold integers"),
        ("over Lmax list", [5, 6, 3], ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("zero list", [5, 0, 3], ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("negative tensor", torch.tensor([5, -1, 3]), ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("beyond int64 list", [5, 2**70, 3], ValueError, r"lens must lie in \[1, Lmax=5\]"),
        ("uint64 wrapping", np.array([5, 2**64 - 1, 3], dtype=np.uint64), ValueError,
         r"lens must lie in \[1, Lmax=5\]"),
        ("too few", [5, 1], ValueError, r"lens must have shape \(n_cap,\) = \(3,\)"),
        ("too many array", np.array([5, 1, 3, 2]), ValueError, r"lens must have shape \(n_cap,\) = \(3,\)"),
        ("0-d array", np.array(3), ValueError, "lens must have shape"),
    ]


@pytest.mark.parametrize("entry", ["scan", "rcar"])
@pytest.mark.parametrize("name,lens,exc,pattern", _lens_cases(), ids=[c[0] for c in _lens_cases()])
def test_bad_lens_raise_one_clear_error_before_any_kernel(entry, name, lens, exc, pattern, monkeypatch):
    from rcar_fast import dispatch
    from rcar_fast.ops import backend as op_backend
    from rcar_fast.ops import scan as scan_ops

    img, cap, _ = _good()
    fn = _entry_points()[entry]

    def no_backend(*args, **kwargs):
        raise AssertionError("no backend may be chosen for bad lens")

    monkeypatch.setattr(dispatch, "choose", no_backend)
    monkeypatch.setattr(op_backend, "choose", no_backend)   # RCARSimilarity's choice
    monkeypatch.setattr(scan_ops, "choose", no_backend)     # scan_similarity's
    with pytest.raises(exc, match=pattern):
        fn(img, cap, lens)


@pytest.mark.parametrize("smooth", [np.float32(9), np.float64(9), np.int64(9), torch.tensor(9.0),
                                    np.array(9.0), 9])
def test_numpy_scalars_and_0d_tensors_are_numbers(smooth):
    img, cap, lens = _good()
    want = rcar_fast.scan_similarity(img, cap, lens, smooth=9.0)
    assert_close(rcar_fast.scan_similarity(img, cap, lens, smooth=smooth), want, SAME_CALL_OTHER_ARGUMENT_FORM)
    assert_close(rcar_fast.scan_similarity(img, cap, lens, lse_lambda=np.float32(6), agg="lse"),
                 rcar_fast.scan_similarity(img, cap, lens, lse_lambda=6.0, agg="lse"), SAME_CALL_OTHER_ARGUMENT_FORM)


@pytest.mark.parametrize("smooth,exc,pattern", [
    ("9", TypeError, "smooth must be a real number, got str"),
    (True, TypeError, "smooth must be a real number, got bool"),
    (None, TypeError, "smooth must be a real number, got NoneType"),
    (torch.tensor([9.0]), TypeError, r"smooth must be a real number \(a scalar or 0-d tensor\)"),
    (torch.tensor(9.0 + 0j), TypeError, "smooth must be a real number"),
    (complex(9, 0), TypeError, "smooth must be a real number"),
    (-1.0, ValueError, "smooth must be a positive finite number"),
    (float("inf"), ValueError, "smooth must be a positive finite number"),
    (10**400, ValueError, "smooth must be a positive finite number"),
])
def test_bad_smooth_one_clear_error(smooth, exc, pattern):
    img, cap, lens = _good()
    with pytest.raises(exc, match=pattern):
        rcar_fast.scan_similarity(img, cap, lens, smooth=smooth)


@pytest.mark.parametrize("smooth", [-1, 0, float("nan"), float("inf"), -5.0, "10", None])
def test_rcar_smooth_checked_in_the_constructor_and_on_assignment(smooth):
    exc = TypeError if isinstance(smooth, str) or smooth is None else ValueError
    with pytest.raises(exc, match="smooth must be a"):
        rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=4, steps=1, smooth=smooth)
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=4, steps=1)
    with pytest.raises(exc, match="smooth must be a"):
        head.smooth = smooth
    assert head.smooth == 10.0, "a refused value must leave the setting as it was"
    head.smooth = np.float32(4)
    assert head.smooth == 4.0 and type(head.smooth) is float


def test_rcar_smooth_above_the_dtype_limit_refused_at_forward():
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=4, steps=1, smooth=1e39).eval()
    img, cap, lens = _good()
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"the head's smooth must be at most 1000 for float32"):
            head(img, cap, lens, backend=backend)
    head.double()
    with pytest.raises(ValueError, match=r"the head's smooth must be at most 1e\+06 for float64"):
        head(img.double(), cap.double(), lens)
    head.smooth = 1e6
    assert bool(torch.isfinite(head(img.double(), cap.double(), lens)).all())


def test_checkpoint_options_with_a_bad_smooth_are_refused():
    from rcar_fast.checkpoint import build_sim_enc

    with pytest.raises(ValueError, match="smooth must be a positive finite number, got -5"):
        build_sim_enc({"rcar_step": 2, "t2i_smooth": -5}, 4, 4)
