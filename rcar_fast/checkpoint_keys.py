"""The official RCAR checkpoint's key layout: where the similarity head's (``sim_enc``) state
lies in a checkpoint, how many alignment / RCR / RAR modules a state dict holds, and what a
state dict lacks or adds against a module's own. Plain dict work, no model code: the head
(rcar_fast.heads) and the checkpoint loader (rcar_fast.checkpoint) both use it.
"""
from __future__ import annotations

from collections.abc import Mapping

SIM_ENC_PREFIXES = ("module.sim_enc.", "sim_enc.")
MODULE_KINDS = ("alv", "rcr", "rar")


def extract_sim_enc_state(state) -> dict:
    """The bare sim_enc state dict inside a checkpoint / model state dict / bare state dict."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state dict (a mapping), got {type(state).__name__}")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    for prefix in SIM_ENC_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def count_official_modules(state) -> dict:
    """How many alv / rcr / rar modules a bare sim_enc state dict holds."""
    counts = {}
    for kind in MODULE_KINDS:
        prefix = f"{kind}_modules."
        indices = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
        counts[kind] = len(indices)
    return counts


def state_mismatch(own: Mapping, state: Mapping, holder: str) -> tuple:
    """(missing, unexpected, mis-shaped) keys of `state` against a module's own state dict
    `own`, each sorted; a mis-shaped entry reads "key: checkpoint (shape) vs <holder> (shape)"."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs {holder} {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mis_shaped


def mismatch_report(missing, unexpected, mis_shaped) -> str:
    return (f"missing keys: {missing}\nunexpected keys: {unexpected}\n"
            f"shape mismatches: {mis_shaped}")
