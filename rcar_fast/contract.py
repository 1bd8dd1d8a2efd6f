"""The similarity contract's constants, in one place (SIMILARITY.md): option names and their
integer codes, the numeric constants of the public code, the dtype codes of the native kernels,
the RCAR head's weight order and the published settings per checkpoint family.

Every other module reads these from here: the Python layer and the Triton kernels import them,
and the C++/CUDA kernels include csrc/contract.h, which is generated from this module

    python -m rcar_fast.contract --header > csrc/contract.h

and checked against it by tests/test_contract.py. This module imports nothing from the package
(and not torch), so that anything may import it.
"""
from __future__ import annotations

import sys

# --------------------------------------------------------------------------------------------
# Enumerations. The integer code of an option is its index in the tuple: the kernels' codes.
# --------------------------------------------------------------------------------------------

DIRECTIONS = ("t2i", "i2t")
RAW_NORMS = ("clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "no_norm", "softmax")
AGGREGATIONS = ("mean", "lse", "max", "sum")
REGULATORS = ("only_rar", "only_rcr", "coop_rcar")
# Element types the CUDA kernels read (their outputs are float32), by torch dtype name.
CUDA_DTYPES = ("float32", "float16", "bfloat16")

DIRECTION_CODES = {name: code for code, name in enumerate(DIRECTIONS)}
RAW_NORM_CODES = {name: code for code, name in enumerate(RAW_NORMS)}
AGG_CODES = {name: code for code, name in enumerate(AGGREGATIONS)}
REGULATOR_CODES = {name: code for code, name in enumerate(REGULATORS)}
CUDA_DTYPE_CODES = {name: code for code, name in enumerate(CUDA_DTYPES)}

# The S-only heads (HEADS.md, rcar_fast.max_similarity): the reduction's direction ("both" is
# both_scale x (t2i + i2t)) and the pooling of the per-word / per-region maxima.
HEAD_DIRECTIONS = ("t2i", "i2t", "both")
POOLS = ("mean", "sum", "max", "lse", "softmax")
HEAD_NORMALIZATIONS = ("none", "unit")
HEAD_CODINGS = ("max", "vsa")      # "vsa": CHAN's VSACoding (i2t), on every backend
HEAD_DIRECTION_CODES = {name: code for code, name in enumerate(HEAD_DIRECTIONS)}
POOL_CODES = {name: code for code, name in enumerate(POOLS)}

# --------------------------------------------------------------------------------------------
# Numeric constants of the public code
# --------------------------------------------------------------------------------------------

EPS = 1e-8          # l2norm / l1norm add it to the norm; cosine clamps its denominator to it
LEAKY_SLOPE = 0.1   # leaky(x) = x if x > 0 else LEAKY_SLOPE * x (LeakyReLU(0.1))

# Input limits that keep a result determined by the inputs rather than by rounding (the
# reasons are in validate.py, which applies them), keyed by torch dtype name.
SMOOTH_LIMITS = {"float64": 1e6, "float32": 1e3}
LSE_LAMBDA_MIN = 1e-30

UNIT_NORM_EPS = 1e-12   # normalize="unit": x / max(|x|, UNIT_NORM_EPS) (torch F.normalize's clamp)
CHAN_TAU = 0.1          # CHAN's belta (lse / softmax pooling temperature) and VSA alpha
# The smallest pooling temperature: x / tau must stay finite in float32 for |x| up to ~1e3.
HEAD_TAU_MIN = 1e-30

# Named settings of max_similarity (HEADS.md "Heads"): each fills these keyword arguments.
HEAD_PRESETS = {
    # VHA coding + lse(0.1) pooling: the released BiGRU CHAN models.
    "chan": {"direction": "t2i", "pool": "lse", "tau": CHAN_TAU, "leaky": False, "normalize": "none"},
    # mask_xattn_one_text (what LAPS's model calls): leaky max-mean both ways, c = 1.
    "laps": {"direction": "both", "pool": "mean", "leaky": True, "normalize": "unit",
             "both_scale": 1.0},
    # AlignmentContrastiveLoss alignment-mode MrSw (every released ALADIN config).
    "aladin": {"direction": "t2i", "pool": "sum", "leaky": False, "normalize": "unit"},
    "teran": {"direction": "t2i", "pool": "sum", "leaky": False, "normalize": "unit"},
    # colbert_score (caption = query, image = document) and DVSA eq. 8: MrSw, encoders normalise.
    "colbert": {"direction": "t2i", "pool": "sum", "leaky": False, "normalize": "none"},
    "dvsa": {"direction": "t2i", "pool": "sum", "leaky": False, "normalize": "none"},
}

# --------------------------------------------------------------------------------------------
# Published settings per checkpoint family (the public SCAN README's training arguments and
# the RCAR scripts; SIMILARITY.md). SCAN's i2t LSE lambda depends on the data set.
# --------------------------------------------------------------------------------------------

SCAN_PUBLISHED = {
    "f30k": {"t2i": {"smooth": 9.0, "lse_lambda": 6.0}, "i2t": {"smooth": 4.0, "lse_lambda": 5.0}},
    "coco": {"t2i": {"smooth": 9.0, "lse_lambda": 6.0}, "i2t": {"smooth": 4.0, "lse_lambda": 20.0}},
}
SCAN_PUBLISHED_RAW_NORM = "clipped_l2norm"
RCAR_PUBLISHED = {"t2i": {"smooth": 10.0}, "i2t": {"smooth": 3.0}, "regulator": "coop_rcar", "steps": 2}


def scan_published(direction: str, dataset: str = "f30k", raw_norm: str = SCAN_PUBLISHED_RAW_NORM,
                   agg: str = "mean") -> dict:
    """Keyword arguments of scan_similarity at the published setting of (dataset, direction)."""
    return dict(direction=direction, raw_norm=raw_norm, agg=agg, **SCAN_PUBLISHED[dataset][direction])


def rcar_smooth(direction: str) -> float:
    """The published RCAR softmax temperature of a direction (t2i_smooth / i2t_smooth)."""
    return RCAR_PUBLISHED[direction]["smooth"]


# --------------------------------------------------------------------------------------------
# The RCAR head's weights, in the one order every native backend reads them: module group by
# group (alv, rcr, rar, eval), modules in index order, within a module its Linears as below.
# Each entry: (group, attribute path inside the module, short name, out_features is 1).
# --------------------------------------------------------------------------------------------

RCAR_GROUPS = (("alv", "alv_modules"), ("rcr", "rcr_modules"), ("rar", "rar_modules"), ("eval", None))
RCAR_LINEARS = (
    ("alv", "sim_transform_w", "wa", False),
    ("rcr", "rcr_matrix_w.0", "w1", False),
    ("rcr", "rcr_matrix_w.2", "w2", False),
    ("rcr", "rcr_smooth_w.0", "ws1", False),
    ("rcr", "rcr_smooth_w.2", "ws2", True),
    ("rar", "rar_q_w.0", "wq", False),
    ("rar", "rar_k_w.0", "wk", False),
    ("rar", "rar_v_w.0", "wv", True),
    ("eval", "sim_eval_w", "we", True),
)


def _attribute(module, path: str):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def rcar_linears(head) -> list:
    """(short name, Linear, out_features is 1) for every Linear of an RCAR head, in the kernels'
    weight order (see RCAR_LINEARS)."""
    walk = []
    for group, attribute in RCAR_GROUPS:
        modules = getattr(head, attribute) if attribute else [head]
        for module in modules:
            walk += [(short, _attribute(module, path), is_vector)
                     for g, path, short, is_vector in RCAR_LINEARS if g == group]
    return walk


# RAR's training-mode dropout (nn.Dropout(0.4) of rar_q_w / rar_k_w), drawn from a counter-based
# hash so that every backend draws the same bits (rcar_fast/dropout.py, kernels/rcar_backward.py,
# csrc/cpu/rcar.cpp): an element is kept iff its 32-bit hash >= RAR_DROPOUT_THRESHOLD.
RAR_DROPOUT_P = 0.4
RAR_DROPOUT_THRESHOLD = int(RAR_DROPOUT_P * 2**32)   # 1717986918
DROPOUT_HASH_MULTIPLIER = 0x45D9F3B                  # the hash's 32-bit mixer constant


# --------------------------------------------------------------------------------------------
# csrc/contract.h
# --------------------------------------------------------------------------------------------

_CPP_ENUMS = (
    ("Direction", DIRECTIONS, ("kT2I", "kI2T")),
    ("RawNorm", RAW_NORMS, ("kClippedL2", "kL2", "kClippedL1", "kL1", "kClipped", "kNoNorm", "kSoftmaxNorm")),
    ("Aggregation", AGGREGATIONS, ("kMean", "kLse", "kMax", "kSum")),
    ("Regulator", REGULATORS, ("kOnlyRar", "kOnlyRcr", "kCoopRcar")),
    ("DType", CUDA_DTYPES, ("kFloat32", "kFloat16", "kBFloat16")),
    ("HeadDirection", HEAD_DIRECTIONS, ("kHeadT2I", "kHeadI2T", "kHeadBoth")),
    ("Pool", POOLS, ("kPoolMean", "kPoolSum", "kPoolMax", "kPoolLse", "kPoolSoftmax")),
)


def header() -> str:
    """The text of csrc/contract.h: the enumerations and constants above as C++."""
    lines = ["// Generated by `python -m rcar_fast.contract --header` from rcar_fast/contract.py.",
             "// Do not edit: change contract.py and regenerate (tests/test_contract.py checks it).",
             "// Plain C++ (no includes), shared by the C++ CPU kernels, the CUDA kernels and the binding.",
             "#pragma once", "", "namespace rcar_contract {", ""]
    for enum, names, cpp_names in _CPP_ENUMS:
        members = ", ".join(f"{cpp} = {code}" for code, cpp in enumerate(cpp_names))
        lines.append(f"// {', '.join(names)}")
        lines.append(f"enum {enum} : int {{ {members} }};")
        lines.append(f"constexpr int k{enum}Count = {len(names)};")
    lines += ["", f"constexpr double kEps = {EPS!r};", f"constexpr float kEpsF = {EPS!r}f;",
              f"constexpr double kLeakySlope = {LEAKY_SLOPE!r};",
              f"constexpr float kLeakySlopeF = {LEAKY_SLOPE!r}f;",
              f"constexpr double kUnitNormEps = {UNIT_NORM_EPS!r};",
              f"constexpr float kUnitNormEpsF = {UNIT_NORM_EPS!r}f;",
              f"constexpr double kRarDropoutP = {RAR_DROPOUT_P!r};",
              f"constexpr unsigned kRarDropoutThreshold = {RAR_DROPOUT_THRESHOLD}u;",
              f"constexpr unsigned kDropoutHashMultiplier = {DROPOUT_HASH_MULTIPLIER:#x}u;", "",
              "}  // namespace rcar_contract", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--header"]:
        sys.exit("usage: python -m rcar_fast.contract --header > csrc/contract.h")
    sys.stdout.write(header())
