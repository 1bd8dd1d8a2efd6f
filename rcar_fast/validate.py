"""Input checks for every public entry point, in one place.

Each check raises TypeError (wrong kind of object / dtype) or ValueError (wrong shape / value)
with a message that names the argument and says what was expected, before any compute runs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from rcar_fast import contract

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LensLike = Union[torch.Tensor, Sequence[int], np.ndarray]


def _require_tensor(x, name: str, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    return x


def features(x, name: str, shape_doc: str) -> torch.Tensor:
    """A (n, rows, d) floating-point feature tensor with no empty dimension."""
    _require_tensor(x, name, shape_doc)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape {shape_doc} (3 dims), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} must be non-empty {shape_doc}, got shape {tuple(x.shape)}")
    return x


def _is_integer_scalar(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class LengthsOf:
    """How the messages of `lengths` name a length argument: caption lengths by default."""
    name: str = "lens"              # the argument
    count: str = "n_cap"            # the number of sequences
    limit: str = "Lmax"             # the padded length
    limit_doc: str = "cap.shape[1]"
    what: str = "caption"           # "the n_cap caption lengths"
    owner: str = "cap"              # the tensor whose device the lengths go to


CAPTION_LENGTHS = LengthsOf()
REGION_LENGTHS = LengthsOf("img_lens", "n_img", "R", "img.shape[1]", "image region", "img")


def _length_range_error(lo, hi, max_len: int, of: LengthsOf = CAPTION_LENGTHS) -> ValueError:
    return ValueError(f"{of.name} must lie in [1, {of.limit}={max_len}] ({of.limit} = {of.limit_doc}), "
                      f"got min {lo}, max {hi}")


def _lengths_from_sequence(lens, n_cap: int, max_len: int, of: LengthsOf = CAPTION_LENGTHS) -> torch.Tensor:
    if isinstance(lens, (str, bytes, dict, set)) or not hasattr(lens, "__iter__"):
        raise TypeError(f"{of.name} must be a sequence, NumPy array or integer tensor of the {n_cap} "
                        f"{of.what} lengths ({of.count},), got {type(lens).__name__}")
    values = list(lens)
    bad = [type(v).__name__ for v in values if not _is_integer_scalar(v)]
    if bad:
        raise TypeError(f"{of.name} must hold integers ({of.what} lengths), got {bad[:3]}...")
    if values and (min(values) < 1 or max(values) > max_len):  # also keeps int64 overflow out
        raise _length_range_error(min(values), max(values), max_len, of)
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def lengths(lens: LensLike, n_cap: int, max_len: int, device: torch.device,
            of: LengthsOf = CAPTION_LENGTHS) -> torch.Tensor:
    """Caption lengths (or the lengths `of` names) as an int64 tensor on `device`, each in
    [1, max_len]."""
    if isinstance(lens, np.ndarray):
        if lens.dtype.kind not in "iu":  # object, float, complex, bool, str arrays
            raise TypeError(f"{of.name} must be an integer array of shape ({n_cap},), got dtype {lens.dtype}")
        if lens.size and lens.dtype.kind == "u" and int(lens.max()) > max_len:  # before a wrapping cast
            raise _length_range_error(int(lens.min()), int(lens.max()), max_len, of)
        lens = torch.from_numpy(np.ascontiguousarray(lens, dtype=np.int64))
    elif not isinstance(lens, torch.Tensor):
        lens = _lengths_from_sequence(lens, n_cap, max_len, of)
    if lens.dtype.is_floating_point or lens.dtype.is_complex or lens.dtype == torch.bool:
        raise TypeError(f"{of.name} must be an integer tensor of shape ({n_cap},), got dtype {lens.dtype}")
    if lens.dim() != 1 or lens.shape[0] != n_cap:
        raise ValueError(f"{of.name} must have shape ({of.count},) = ({n_cap},), got {tuple(lens.shape)}")
    if lens.device.type != "cpu" and lens.device != device:
        raise ValueError(f"{of.name} must be on the CPU or on {of.owner}'s device {device}, got {lens.device}")
    # Value checks read the data: done eagerly; inside torch.compile (a traced training step)
    # the graph is built without them, its caller having validated its inputs eagerly.
    if not torch.compiler.is_compiling():
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 1 or hi > max_len:
            raise _length_range_error(lo, hi, max_len, of)
    return lens.to(device=device, dtype=torch.int64)


def word_mask(lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """(n_cap, max_len) bool, True at real (non-padding) word positions."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


# The NaN/Inf check walks the features in blocks of about this many bytes: its temporaries
# must not outgrow the fused kernels it guards (a boolean-mask gather of every real word would
# copy the whole caption tensor).
FINITE_CHECK_BLOCK_BYTES = 64 * 2**20


def all_finite(x: torch.Tensor, real: Optional[torch.Tensor] = None) -> bool:
    """True if x (n, M, d) holds no NaN/Inf, looking only at rows [i, m] where real[i, m]
    (n, M) is True when given. Temporaries stay below FINITE_CHECK_BLOCK_BYTES."""
    per_item = max(1, x[0].numel() * x.element_size()) if x.shape[0] else 1
    step = max(1, FINITE_CHECK_BLOCK_BYTES // per_item)
    for start in range(0, x.shape[0], step):
        finite = torch.isfinite(x[start:start + step]).all(dim=-1)
        if real is not None:
            finite |= ~real[start:start + step]
        if not bool(finite.all()):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _native_finite_check():
    """The C++ check of the real rows (csrc/cpu/maxsim.cpp real_rows_finite), None where the
    extension is not importable."""
    try:
        return importlib.import_module("rcar_fast._C").real_rows_finite_cpu
    except (ImportError, AttributeError):
        return None


def real_rows_finite(x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> bool:
    """True if the rows m < lengths[i] of x (n, M, d) (every row when lengths is None) hold no
    NaN/Inf. float32 / float64 CPU tensors go to the native check (it reads those rows once,
    on the thread team, and allocates nothing); other tensors to all_finite."""
    check = (_native_finite_check() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
             else None)
    if check is None:
        return all_finite(x, None if lengths is None else word_mask(lengths, x.shape[1]))
    counts = lengths if lengths is not None else torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
    return bool(check(x, counts))


def feature_pair(img, cap, names: tuple = ("img", "cap"),
                 shapes: tuple = ("(n_img, R, d)", "(n_cap, Lmax, d)"), dim: str = "d") -> None:
    """Two feature tensors that one tile multiplies: each a non-empty (n, rows, d) float
    tensor, with one feature size, device and dtype. `names` / `shapes` name them in messages."""
    (a_name, b_name), (a_shape, b_shape) = names, shapes
    features(img, a_name, a_shape)
    features(cap, b_name, b_shape)
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"{a_name} and {b_name} must share the feature size {dim}: {a_name} is "
                         f"{tuple(img.shape)} ({dim}={img.shape[2]}), {b_name} is {tuple(cap.shape)} "
                         f"({dim}={cap.shape[2]})")
    if img.device != cap.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a_name} on "
                         f"{img.device}, {b_name} on {cap.device}")
    if img.dtype != cap.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a_name} {img.dtype}, "
                        f"{b_name} {cap.dtype}")


def similarity_inputs(img, cap, lens: LensLike, check_finite: bool = True) -> torch.Tensor:
    """Checks (img, cap, lens) of an all-pairs similarity call; returns lens as int64 on
    cap's device. NaN/Inf are allowed in caption padding only."""
    feature_pair(img, cap)
    lens_t = lengths(lens, cap.shape[0], cap.shape[1], cap.device)
    if check_finite and not torch.compiler.is_compiling():  # reads the data: eager only
        if not real_rows_finite(img):
            raise ValueError("img holds NaN or Inf values")
        if not real_rows_finite(cap, lens_t):
            raise ValueError("cap holds NaN or Inf at real word positions (positions < lens); "
                             "only padding may be non-finite")
    return lens_t


def choice(value, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def number(value, name: str) -> float:
    """A real number given as a Python or NumPy scalar or a 0-d real tensor, as a float."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        real = (value.dtype != torch.bool and not value.dtype.is_complex if isinstance(value, torch.Tensor)
                else value.dtype.kind in "iuf")
        if value.ndim != 0 or not real:
            raise TypeError(f"{name} must be a real number (a scalar or 0-d tensor), got a "
                            f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # a Python int beyond float range
        return float("inf") if value > 0 else float("-inf")


def positive_number(value, name: str) -> float:
    value_f = number(value, name)
    if not math.isfinite(value_f) or value_f <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value_f


def non_negative_number(value, name: str) -> float:
    value_f = number(value, name)
    if not math.isfinite(value_f) or value_f < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value_f


# The attention's softmax multiplies the normalised scores, and so their rounding error, by
# `smooth`: the relative error of a similarity grows like 0.1 x smooth x (unit roundoff) (measured
# on the cpu kernels, every raw_norm, both directions). Above these limits a float32 result would
# miss the float32 tolerance (1e-4) of the float64 reference, a float64 one 1e-9: the result would
# depend on rounding rather than on the inputs. float16 / bfloat16 inputs: the kernels compute in
# float32, so the float32 limit applies.
SMOOTH_LIMITS = {getattr(torch, name): limit for name, limit in contract.SMOOTH_LIMITS.items()}

# log(sum exp(lse_lambda r)) / lse_lambda is about log(words) / lse_lambda for a tiny
# lse_lambda; below this it would overflow float32.
LSE_LAMBDA_MIN = contract.LSE_LAMBDA_MIN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def smooth_for(value, dtype: torch.dtype, name: str = "smooth") -> float:
    """A positive finite softmax temperature within the limit of the inputs' dtype."""
    value_f = positive_number(value, name)
    limit = SMOOTH_LIMITS.get(dtype, SMOOTH_LIMITS[torch.float32])
    if value_f > limit:
        raise ValueError(
            f"{name} must be at most {limit:g} for {_dtype_name(dtype)} inputs, got {value!r}: "
            f"a larger softmax temperature amplifies rounding beyond the {_dtype_name(dtype)} tolerance"
            + (" (float64 inputs allow up to 1e6)" if dtype != torch.float64 else ""))
    return value_f


def lse_lambda_value(value, name: str = "lse_lambda") -> float:
    value_f = positive_number(value, name)
    if value_f < LSE_LAMBDA_MIN:
        raise ValueError(f"{name} must be at least {LSE_LAMBDA_MIN:g}, got {value!r}: "
                         "log(sum exp(lse_lambda r)) / lse_lambda would overflow")
    return value_f


def _index_tensor(idx, name: str, bound: int, bound_name: str, device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.as_tensor(idx, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D integer tensor (P,), got {type(idx).__name__}") from err
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape (P,), got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must have shape (P,), got {tuple(idx.shape)}")
    # The range check reads the data: eager only, as for lens (see lengths()).
    if not torch.compiler.is_compiling() and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise ValueError(f"{name} values must lie in [0, {bound_name}={bound}), got min "
                         f"{int(idx.min())}, max {int(idx.max())}")
    return idx.to(device=device, dtype=torch.int64)


def pair_indices(img_idx, cap_idx, n_img: int, n_cap: int, device) -> tuple:
    """(img_idx, cap_idx) of a pair list: two 1-D integer sequences / tensors of one length P,
    values in [0, n_img) and [0, n_cap), as int64 tensors on `device`."""
    return named_pair_indices(img_idx, cap_idx, n_img, n_cap, device)


def head_fits(head, img: torch.Tensor) -> None:
    """An RCAR head can score these features: d = the head's embed_dim, its smooth within the
    limit of img's dtype, and its parameters on img's device."""
    if img.shape[2] != head.embed_dim:
        raise ValueError(f"img and cap must have d = the head's embed_dim = {head.embed_dim}, "
                         f"got d = {img.shape[2]}")
    smooth_for(head.smooth, img.dtype, "the head's smooth")
    param = next(head.parameters())
    if param.device != img.device:
        raise ValueError(f"img/cap are on {img.device} but the head's parameters are on "
                         f"{param.device}; move one of them")


# ---------------------------------------------------------------------------------------------
# The S-only heads (rcar_fast.max_similarity, rcar_fast.maxsim)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeadArguments:
    """How the messages of head_inputs name the two feature tensors and their lengths."""
    names: tuple = ("img", "cap")
    shapes: tuple = ("(n_img, R, d)", "(n_cap, Lmax, d)")
    dim: str = "d"
    lens: LengthsOf = CAPTION_LENGTHS
    img_lens: LengthsOf = REGION_LENGTHS


MAX_SIMILARITY_ARGUMENTS = HeadArguments()
# maxsim(q, d, q_lens, d_lens): the document plays the image, the query the caption.
MAXSIM_ARGUMENTS = HeadArguments(
    ("d", "q"), ("(n_d, Ld, dim)", "(n_q, Lq, dim)"), "dim",
    LengthsOf("q_lens", "n_q", "Lq", "q.shape[1]", "query token", "q"),
    LengthsOf("d_lens", "n_d", "Ld", "d.shape[1]", "document token", "d"))


def _full_lengths(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)


def head_inputs(img, cap, lens, img_lens=None, args: HeadArguments = MAX_SIMILARITY_ARGUMENTS,
                check_finite: bool = True) -> tuple:
    """Checks the tensors of a head call; returns (lens, img_lens) as int64 on the features'
    device (img_lens None: every region real). NaN/Inf are allowed in padding only (regions
    >= img_lens, words >= lens)."""
    feature_pair(img, cap, args.names, args.shapes, args.dim)
    lens_t = _full_lengths(cap) if lens is None else lengths(lens, cap.shape[0], cap.shape[1],
                                                               cap.device, args.lens)
    img_lens_t = _full_lengths(img) if img_lens is None else lengths(
        img_lens, img.shape[0], img.shape[1], img.device, args.img_lens)
    if check_finite and not torch.compiler.is_compiling():  # reads the data: eager only
        for x, name, counts, of in ((img, args.names[0], img_lens_t, args.img_lens),
                                    (cap, args.names[1], lens_t, args.lens)):
            if not real_rows_finite(x, counts):
                raise ValueError(f"{name} holds NaN or Inf at real positions (rows < {of.name}); "
                                 "only padding may be non-finite")
    return lens_t, img_lens_t


def flag(value, name: str) -> bool:
    """A bool (Python or NumPy), as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def finite_number(value, name: str) -> float:
    value_f = number(value, name)
    if not math.isfinite(value_f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value_f


def temperature(value, name: str) -> float:
    """A pooling / coding temperature: positive, finite, at least contract.HEAD_TAU_MIN."""
    value_f = positive_number(value, name)
    if value_f < contract.HEAD_TAU_MIN:
        raise ValueError(f"{name} must be at least {contract.HEAD_TAU_MIN:g}, got {value!r}: "
                         f"x / {name} would overflow")
    return value_f


_HEAD_CHOICES = {"direction": contract.HEAD_DIRECTIONS, "pool": contract.POOLS,
                 "normalize": contract.HEAD_NORMALIZATIONS, "coding": contract.HEAD_CODINGS}


def _head_setting(key: str, value):
    """One max_similarity setting, checked (and numbers / flags converted)."""
    if key in _HEAD_CHOICES:
        return choice(value, key, _HEAD_CHOICES[key])
    if key in ("tau", "vsa_tau"):
        return temperature(value, key)
    if key == "leaky":
        return flag(value, key)
    if key == "both_scale":
        return finite_number(value, key)
    raise TypeError(f"unexpected head setting {key!r}")


def head_settings(preset, given: dict, defaults: dict) -> dict:
    """The settings of a max_similarity call: `given` holds the keyword arguments the caller
    passed, `defaults` the signature's defaults. Each passed setting is checked; a preset
    (contract.HEAD_PRESETS) then fills its settings, and a passed argument that contradicts one
    is a ValueError naming both; VSA's limits last."""
    given = {key: _head_setting(key, value) for key, value in given.items()}
    settings = dict(defaults)
    if preset is not None:
        choice(preset, "preset", tuple(contract.HEAD_PRESETS))
        for key, value in contract.HEAD_PRESETS[preset].items():
            if key in given and given[key] != value:
                raise ValueError(f"preset={preset!r} sets {key}={value!r}, but {key}={given[key]!r} "
                                 f"was passed: drop the preset or the argument")
            settings[key] = value
    settings.update(given)
    if settings["coding"] == "vsa":
        if settings["direction"] != "i2t":
            raise ValueError("coding='vsa' (CHAN's VSACoding) codes regions: it needs "
                             f"direction='i2t', got direction={settings['direction']!r}")
        if settings["leaky"]:
            raise ValueError("coding='vsa' takes leaky=False (CHAN's VSA coding has no leaky)")
    return settings


def positive_int(value, name: str, upper: Optional[int] = None, upper_doc: str = "") -> int:
    """A Python / NumPy integer >= 1 (and <= upper when given)."""
    if not _is_integer_scalar(value):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f" and at most {upper_doc}={upper}" if upper is not None else ""
        raise ValueError(f"{name} must be at least 1{bound}, got {value!r}")
    return int(value)


def named_pair_indices(first, second, n_first: int, n_second: int, device,
                       names: tuple = ("img_idx", "cap_idx"),
                       bound_names: tuple = ("n_img", "n_cap")) -> tuple:
    """pair_indices with other argument names (maxsim's q_idx / d_idx)."""
    first = _index_tensor(first, names[0], n_first, bound_names[0], device)
    second = _index_tensor(second, names[1], n_second, bound_names[1], device)
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length P, got "
                         f"{first.numel()} and {second.numel()}")
    return first, second
