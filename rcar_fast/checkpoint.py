"""Official RCAR checkpoints (``model_best.pth`` of Paranioar/RCAR) in and out.

The format: a ``torch.save``'d dict with

* ``model``: the state dict of the ``nn.DataParallel``-wrapped SCANpp model, keys
  ``module.img_enc.*``, ``module.txt_enc.*``, ``module.sim_enc.*``;
* ``opt``: the training ``argparse.Namespace`` (``self_regulator``, ``rcar_step`` /
  ``rcr_step`` / ``rar_step``, ``attn_type``, ``t2i_smooth``, ``i2t_smooth``,
  ``embed_size``, ``sim_dim``, ``img_dim``, ``word_dim``, ``num_layers``, ``use_bi_gru``,
  ``no_imgnorm``, ``no_txtnorm``, ``data_name``, ...);
* ``epoch`` (and sometimes ``best_rsum``, ``Eiters``).

Official SCAN checkpoints (kuanghuei/SCAN ``model_best.pth.tar``) hold instead
``model = [img_enc state dict, txt_enc state dict]`` (``fc.*``; ``embed.*``, ``rnn.*``) and
an ``opt`` with ``cross_attn``, ``raw_feature_norm``, ``agg_func``, ``lambda_lse``,
``lambda_softmax``, ``bi_gru``, ``precomp_enc_type``, ``no_imgnorm``, ``no_txtnorm``;
``load_scan_checkpoint`` builds the SCAN encoders and a ``SCANHead`` from them and
``load_checkpoint`` picks the right loader from the file's layout.

``load_rcar_checkpoint`` rebuilds the whole model from it. Sizes are read from the weights
(and checked against ``opt`` where it has them); the regulator, step count, direction and
smooth come from ``opt``. Loading uses ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` allowed besides tensors, so a checkpoint cannot run code; pass
``trusted=True`` for files that need more (only for files you trust).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Optional

import torch

from rcar_fast.atomic import atomic_path
from rcar_fast.checkpoint_keys import (count_official_modules, mismatch_report,
                                       state_mismatch)
from rcar_fast.contract import DIRECTIONS, RAW_NORMS, rcar_smooth
from rcar_fast.encoders import (EncoderImage, EncoderImagePrecomp, EncoderText, RCARModel,
                                SCANHead)
from rcar_fast.heads import module_counts

__all__ = ["load_rcar_checkpoint", "load_scan_checkpoint", "load_checkpoint",
           "save_rcar_checkpoint", "official_state_dict", "build_sim_enc", "CheckpointError"]

_STEP_OPTION = {"only_rar": "rar_step", "only_rcr": "rcr_step", "coop_rcar": "rcar_step"}
_PARTS = ("img_enc", "txt_enc", "sim_enc")


class CheckpointError(ValueError):
    """The file is not a usable official RCAR checkpoint; the message says what is wrong."""


def _sim_head_class():
    """The public RCAR head (fused backends) if importable, else the reference head."""
    try:
        from rcar_fast.modules import RCARSimilarity

        return RCARSimilarity
    except ImportError:
        from rcar_fast.heads import RCARHead

        return RCARHead


def _read(path, map_location, trusted):
    if isinstance(path, Mapping):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle and zip errors of several kinds
        first_line = str(err).splitlines()[0] if str(err) else ""
        if _needs_trust(err):
            raise CheckpointError(
                f"{path} holds Python objects that a weights-only load refuses "
                f"({type(err).__name__}: {first_line}). If it is a checkpoint you trust, pass "
                "trusted=True (rcar-fast eval --trust-checkpoint).") from None
        raise CheckpointError(
            f"cannot read {path}: it is truncated or not a torch checkpoint "
            f"({type(err).__name__}: {first_line})") from None


def _needs_trust(err: Exception) -> bool:
    """Whether torch.load refused an object the weights-only unpickler does not allow (as
    opposed to a truncated or malformed file, which --trust-checkpoint cannot fix)."""
    import pickle

    return isinstance(err, pickle.UnpicklingError) and (
        "Weights only load failed" in str(err) or "Unsupported global" in str(err))


def _options(raw) -> dict:
    opt = raw.get("opt")
    if opt is None:
        raise CheckpointError("checkpoint has no 'opt' entry (the training options); an "
                              "official RCAR checkpoint is a dict with 'model', 'opt', 'epoch'")
    if isinstance(opt, argparse.Namespace):
        return vars(opt)
    if isinstance(opt, Mapping):
        return dict(opt)
    raise CheckpointError(f"checkpoint 'opt' must be an argparse.Namespace or a dict, got "
                          f"{type(opt).__name__}")


def _split_state(raw) -> dict:
    state = raw.get("model")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError("checkpoint has no 'model' state dict; an official RCAR checkpoint "
                              "is a dict with 'model', 'opt', 'epoch'")
    parts = {name: {} for name in _PARTS}
    stray = []
    for key, value in state.items():
        bare = key[len("module."):] if key.startswith("module.") else key
        head, _, rest = bare.partition(".")
        if head in parts and rest:
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"checkpoint entry {key!r} is not a tensor")
            parts[head][rest] = value
        else:
            stray.append(key)
    missing = [name for name in _PARTS if not parts[name]]
    if missing or stray:
        raise CheckpointError(
            f"checkpoint 'model' must hold img_enc.*, txt_enc.* and sim_enc.* weights (with or "
            f"without the DataParallel 'module.' prefix); missing parts: {missing}; "
            f"unrecognised keys: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
    return parts


def _require(state: dict, key: str, part: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"checkpoint has no {part}.{key}; cannot infer the model sizes")
    return state[key]


def _check_against_opt(opt: dict, name: str, value):
    if name in opt and opt[name] is not None and opt[name] != value:
        raise CheckpointError(f"checkpoint opt.{name} = {opt[name]!r} but the weights say {value!r}")


def build_sim_enc(opt: dict, embed_size: int, sim_dim: int):
    """The RCAR head described by official options (self_regulator, *_step, attn_type, smooth)."""
    regulator = opt.get("self_regulator", "coop_rcar")
    if regulator not in _STEP_OPTION:
        raise CheckpointError(f"opt.self_regulator must be one of {tuple(_STEP_OPTION)}, got "
                              f"{regulator!r}")
    steps = opt.get(_STEP_OPTION[regulator])
    if not isinstance(steps, int) or steps < 0:
        raise CheckpointError(f"opt.{_STEP_OPTION[regulator]} (the step count of {regulator}) "
                              f"must be a non-negative integer, got {steps!r}")
    direction = opt.get("attn_type", "t2i")
    if direction not in DIRECTIONS:
        raise CheckpointError(f"opt.attn_type must be 't2i' or 'i2t', got {direction!r}")
    smooth = opt.get(f"{direction}_smooth", rcar_smooth(direction))
    return _sim_head_class()(embed_dim=embed_size, sim_dim=sim_dim, regulator=regulator,
                             steps=steps, direction=direction, smooth=float(smooth))


def _load_part(module: torch.nn.Module, state: dict, part: str):
    mismatch = state_mismatch(module.state_dict(), state, "model")
    if any(mismatch):
        counts = ""
        if part == "sim_enc":
            counts = (f" ({module.regulator} with {module.steps} steps needs "
                      f"{module_counts(module.regulator, module.steps)} modules, the weights "
                      f"hold {count_official_modules(state)})")
        raise CheckpointError(f"{part} weights do not fit the model the options describe"
                              f"{counts}.\n" + mismatch_report(*mismatch))
    module.load_state_dict(state, strict=True)


def load_rcar_checkpoint(path, map_location="cpu", *, trusted: bool = False) -> RCARModel:
    """Builds an ``RCARModel`` (img_enc, txt_enc, sim_enc) from an official RCAR checkpoint.

    Args:
        path: a ``model_best.pth``-style file, or the already loaded dict.
        map_location: where the weights go (as ``torch.load``).
        trusted: load with ``weights_only=False`` (arbitrary pickles; trusted files only).
    Returns:
        the model in eval mode, with ``.opt`` (dict of the training options) and ``.epoch``.
    Raises:
        FileNotFoundError; CheckpointError (a ValueError) naming what is missing or wrong.
    """
    raw = _read(path, map_location, trusted)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint must be a dict with 'model', 'opt', 'epoch', got "
                              f"{type(raw).__name__}")
    opt = _options(raw)
    parts = _split_state(raw)

    fc_weight = _require(parts["img_enc"], "fc.weight", "img_enc")
    embed_weight = _require(parts["txt_enc"], "embed.weight", "txt_enc")
    sim_eval = _require(parts["sim_enc"], "sim_eval_w.weight", "sim_enc")
    embed_size, img_dim = fc_weight.shape
    vocab_size, word_dim = embed_weight.shape
    sim_dim = sim_eval.shape[1]
    num_layers = len({k.split("_l")[-1].split("_")[0] for k in parts["txt_enc"]
                      if k.startswith("rnn.weight_ih_l")})
    bidirectional = any(k.endswith("_reverse") for k in parts["txt_enc"])
    for name, value in (("embed_size", embed_size), ("img_dim", img_dim), ("word_dim", word_dim),
                        ("sim_dim", sim_dim), ("num_layers", num_layers),
                        ("use_bi_gru", bidirectional)):
        _check_against_opt(opt, name, value)

    img_enc = EncoderImage(img_dim, embed_size, no_imgnorm=bool(opt.get("no_imgnorm", False)))
    txt_enc = EncoderText(vocab_size, embed_size, word_dim, max(num_layers, 1), bidirectional,
                          no_txtnorm=bool(opt.get("no_txtnorm", False)))
    sim_enc = build_sim_enc(opt, embed_size, sim_dim)
    for part, module in zip(_PARTS, (img_enc, txt_enc, sim_enc)):
        _load_part(module, parts[part], part)
    model = RCARModel(img_enc, txt_enc, sim_enc, opt=opt, epoch=raw.get("epoch"))
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def official_state_dict(model: RCARModel) -> dict:
    """The model's state dict with DataParallel names (``module.img_enc.fc.weight`` ...)."""
    return {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()
            if k.split(".", 1)[0] in _PARTS}


def save_rcar_checkpoint(model: RCARModel, path, opt=None, epoch: Optional[int] = None) -> None:
    """Writes ``model`` in the official format (atomically: a temporary file, then a rename).
    ``opt`` (Namespace or dict) defaults to the model's own options."""
    opt = opt if opt is not None else model.opt
    if isinstance(opt, Mapping):
        opt = argparse.Namespace(**opt)
    if not isinstance(opt, argparse.Namespace):
        raise TypeError("opt must be an argparse.Namespace or a dict of the training options")
    with atomic_path(path) as tmp:
        torch.save({"model": official_state_dict(model), "opt": opt,
                    "epoch": epoch if epoch is not None else model.epoch}, tmp)


# ---------------------------------------------------------------------------------------------
# Official SCAN checkpoints
# ---------------------------------------------------------------------------------------------

# SCAN's agg_func names -> rcar_fast's agg names.
_SCAN_AGG = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}
# SCAN train.py defaults, for options an old checkpoint may lack.
_SCAN_DEFAULTS = dict(cross_attn="t2i", raw_feature_norm="clipped_l2norm", agg_func="LogSumExp",
                      lambda_lse=6.0, lambda_softmax=9.0, precomp_enc_type="basic",
                      no_imgnorm=False, no_txtnorm=False)


def is_scan_checkpoint(raw) -> bool:
    """SCAN saves model = [img_enc state, txt_enc state]; RCAR saves one state dict."""
    model = raw.get("model") if isinstance(raw, Mapping) else None
    return isinstance(model, (list, tuple))


def build_scan_head(opt: dict) -> SCANHead:
    """The SCAN head the official options describe."""
    opt = {**_SCAN_DEFAULTS, **{k: v for k, v in opt.items() if v is not None}}
    if opt["cross_attn"] not in DIRECTIONS:
        raise CheckpointError(f"opt.cross_attn must be 't2i' or 'i2t', got {opt['cross_attn']!r}")
    if opt["raw_feature_norm"] not in RAW_NORMS:
        raise CheckpointError(f"opt.raw_feature_norm must be one of {RAW_NORMS}, got "
                              f"{opt['raw_feature_norm']!r}")
    if opt["agg_func"] not in _SCAN_AGG:
        raise CheckpointError(f"opt.agg_func must be one of {tuple(_SCAN_AGG)}, got "
                              f"{opt['agg_func']!r}")
    for name in ("lambda_lse", "lambda_softmax"):
        value = opt[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or value == float("inf"):
            raise CheckpointError(f"opt.{name} must be a positive finite number, got {value!r}")
    return SCANHead(direction=opt["cross_attn"], raw_norm=opt["raw_feature_norm"],
                    smooth=float(opt["lambda_softmax"]), agg=_SCAN_AGG[opt["agg_func"]],
                    lse_lambda=float(opt["lambda_lse"]))


def _scan_states(raw):
    states = raw["model"]
    if len(states) != 2 or not all(isinstance(st, Mapping) for st in states):
        raise CheckpointError("a SCAN checkpoint's 'model' must be [img_enc state dict, "
                              f"txt_enc state dict], got a {type(states).__name__} of "
                              f"{len(states)} entries")
    for part, state in zip(("img_enc", "txt_enc"), states):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"SCAN checkpoint entry {part}.{key} is not a tensor")
    return dict(states[0]), dict(states[1])


def load_scan_checkpoint(path, map_location="cpu", *, trusted: bool = False) -> RCARModel:
    """Builds the SCAN model (image and text encoders, ``SCANHead`` as ``sim_enc``) from an
    official SCAN checkpoint. Same arguments, result type and errors as load_rcar_checkpoint."""
    raw = _read(path, map_location, trusted)
    if not is_scan_checkpoint(raw):
        raise CheckpointError("not a SCAN checkpoint: 'model' must be [img_enc state dict, "
                              "txt_enc state dict]")
    opt = _options(raw)
    img_state, txt_state = _scan_states(raw)
    weight_norm = opt.get("precomp_enc_type", "basic") == "weight_norm"
    if opt.get("precomp_enc_type", "basic") not in ("basic", "weight_norm"):
        raise CheckpointError(f"opt.precomp_enc_type must be 'basic' or 'weight_norm', got "
                              f"{opt.get('precomp_enc_type')!r}")
    fc_key = "fc.weight_v" if weight_norm else "fc.weight"
    embed_size, img_dim = _require(img_state, fc_key, "img_enc").shape
    vocab_size, word_dim = _require(txt_state, "embed.weight", "txt_enc").shape
    num_layers = len({k[len("rnn.weight_ih_l"):].split("_")[0] for k in txt_state
                      if k.startswith("rnn.weight_ih_l")})
    bidirectional = any(k.endswith("_reverse") for k in txt_state)
    for name, value in (("embed_size", embed_size), ("img_dim", img_dim), ("word_dim", word_dim),
                        ("num_layers", num_layers), ("bi_gru", bidirectional)):
        _check_against_opt(opt, name, value)

    img_enc = EncoderImagePrecomp(img_dim, embed_size, no_imgnorm=bool(opt.get("no_imgnorm", False)),
                                  weight_norm=weight_norm)
    txt_enc = EncoderText(vocab_size, embed_size, word_dim, max(num_layers, 1), bidirectional,
                          no_txtnorm=bool(opt.get("no_txtnorm", False)))
    # The public EncoderImagePrecomp.load_state_dict keeps only the keys it knows; the
    # text encoder loads strictly. Here both load strictly: a stray key means another model.
    _load_part(img_enc, img_state, "img_enc")
    # SCAN's text encoder has no dropout module; ours has one without weights: same keys.
    _load_part(txt_enc, txt_state, "txt_enc")
    model = RCARModel(img_enc, txt_enc, build_scan_head(opt), opt=opt, epoch=raw.get("epoch"))
    model.kind = "scan"
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def load_checkpoint(path, map_location="cpu", *, trusted: bool = False) -> RCARModel:
    """An official RCAR or SCAN checkpoint, told apart by its layout; ``model.kind`` is
    "rcar" or "scan"."""
    raw = _read(path, map_location, trusted)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint must be a dict with 'model', 'opt', 'epoch', got "
                              f"{type(raw).__name__}")
    if is_scan_checkpoint(raw):
        return load_scan_checkpoint(raw, map_location, trusted=trusted)
    model = load_rcar_checkpoint(raw, map_location, trusted=trusted)
    model.kind = "rcar"
    return model
