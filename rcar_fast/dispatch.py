"""Backend choice by op name: which implementation of an op runs, and why the others do not.

TABLE below is the whole registry, assembled from OP_FAMILIES: the plumbing op gram and every
head of the head registry (rcar_fast.scorers.SCORERS), each Scorer's `backends` being its op
module's BACKENDS (rcar_fast/ops/<op>.py lists its backend classes per op there: one small
class per op and backend, see rcar_fast.ops.backend.Backend). A new head is in TABLE by its
entry in SCORERS; nothing here names it. Each class judges the full inputs of a call
(rcar_fast.ops.backend.Inputs: environment, device, dtype, shapes, whether a backward follows,
active dropout) in `not_supported_reasons`. `choose` runs the requested backend or, for
backend="auto", the first of AUTO_ORDER that takes the inputs; when none does (or the requested
one does not), one BackendUnavailable lists every backend's reasons, before any kernel runs
(the one algorithm, rcar_fast.ops.backend.choose, which the op modules' wrappers call on their
own BACKENDS). `backends()` reports, per backend, whether it is present on this machine and
what it implements.

Layering: callers by op name (pairs, losses, evaluation, the CLI, the trainer, bench) ->
dispatch -> the head registry (scorers) -> the models (modules.RCARSimilarity) -> the op
modules (custom ops, backends, wrappers) -> ops.library, ops.backend -> kernels / the native
extension. Nothing below imports this module: the wrappers choose among their own op's
BACKENDS with rcar_fast.ops.backend.choose, the one algorithm this module also runs.

Adding a backend (say "foo" for SCAN) touches:
  1. its kernel: kernels/foo.py (Triton) or its native unit(s) under csrc/;
  2. rcar_fast/ops/scan.py: class ScanFoo(Backend) with its dtypes, capability flags
     (has_backward, implements_dropout), extra_reasons (shape limits), environment (whether
     "foo" is present here) and fn, the kernel wrapped as a custom op with define_scan_op
     (forward, backward; fake and autograd come with it); ScanFoo in BACKENDS["scan"];
  3. tests/test_scan_foo.py (numerics against the float64 reference; opcheck of the op);
  and, only for a backend NAME new to the project, rcar_fast/ops/backend.py: "foo" in
  BACKEND_NAMES (and in AUTO_ORDER if auto should try it). This module is not touched.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from rcar_fast import scorers
from rcar_fast.ops import backend as _backend
from rcar_fast.ops import gram
from rcar_fast.ops.backend import (AUTO_ORDER, BACKEND_NAMES, Backend,  # noqa: F401
                                   BackendUnavailable, Inputs, environment_reason, native_module,
                                   triton_interpreter_on, triton_module)

# The op families whose backends make up TABLE, {op: backend classes} each: the plumbing op
# gram (no head) and every head of the registry (its Scorer's `backends`, its op module's
# BACKENDS: ops/scan.py, ops/rcar.py, ops/maxsim.py).
OP_FAMILIES: tuple = (gram.BACKENDS,) + tuple(scorer.backends for scorer in scorers.SCORERS)

# op -> its backend classes (BACKENDS, the requestable names, follow from it).
TABLE: dict[str, tuple[type[Backend], ...]] = {
    op: classes for family in OP_FAMILIES for op, classes in family.items()}


def _check_table() -> dict[tuple[str, str], type[Backend]]:
    by_key = {}
    for op, classes in TABLE.items():
        for cls in classes:
            if cls.op != op or not getattr(cls, "backend", None) or (op, cls.backend) in by_key:
                raise ValueError(f"dispatch.TABLE[{op!r}] holds {cls.__name__} (op {cls.op!r}, "
                                 f"backend {getattr(cls, 'backend', None)!r}): wrong op, no or "
                                 "repeated backend")
            by_key[(op, cls.backend)] = cls
    return by_key


_BY_KEY = _check_table()
# Every backend of the table, in the order of its first appearance.
BACKENDS = tuple(dict.fromkeys(backend for (_, backend) in _BY_KEY))
# What backend= may say (the op modules' wrappers check ops.backend.REQUESTABLE, the same names:
# tests/test_dispatch.py holds them equal).
REQUESTABLE = ("auto",) + BACKENDS


def implementation(op: str, backend: str) -> Optional[type[Backend]]:
    return _BY_KEY.get((op, backend))


def not_in_auto(op: str, backend: str) -> Optional[str]:
    """Why backend="auto" never tries `backend` for `op` (None: it does, in AUTO_ORDER)."""
    return _backend.not_in_auto(implementation(op, backend))


def auto_order(op: str, device_type: str) -> tuple:
    """The backends backend="auto" tries for `op` on `device_type` tensors, in order."""
    return tuple(be for be in AUTO_ORDER.get(device_type, ("reference",)) if not not_in_auto(op, be))


def _capabilities(op: str, cls: type[Backend]) -> dict:
    note = not_in_auto(op, cls.backend)
    return cls.capabilities() if note is None else {**cls.capabilities(), "not_in_auto": note}


def backends() -> dict[str, dict]:
    """Every backend: whether it can run here, why not, the ops it implements and, per op,
    what it can do (has_backward, implements_dropout, dtypes per device; not_in_auto: why
    backend="auto" leaves it out for that op, where it does).

    >>> rcar_fast.backends()["cuda"]["reason"]
    'CUDA kernels are built, but no CUDA GPU is visible'
    """
    report = {}
    for name in BACKENDS:
        classes = {op: cls for (op, be), cls in _BY_KEY.items() if be == name}
        reason = next(iter(classes.values())).environment()
        report[name] = {
            "available": reason is None,
            "reason": reason or "available",
            "ops": sorted(classes),
            "capabilities": {op: _capabilities(op, cls) for op, cls in sorted(classes.items())},
        }
    return report


def _as_inputs(inputs: Union[Inputs, torch.device], dtype: Optional[torch.dtype]) -> Inputs:
    # (device, dtype) alone asks about device and dtype only, as backends() and tests do.
    return inputs if isinstance(inputs, Inputs) else Inputs(torch.device(inputs), dtype)


def _classes(op: str) -> tuple:
    # Through _BY_KEY, the one lookup every question here goes through (tests patch it).
    return tuple(cls for (name, _), cls in _BY_KEY.items() if name == op)


def reasons(op: str, backend: str, inputs: Union[Inputs, torch.device],
            dtype: Optional[torch.dtype] = None) -> list[str]:
    """Why `backend` cannot run `op` on these inputs ([] if it can)."""
    return _backend.reasons(op, _classes(op), backend, _as_inputs(inputs, dtype))


def rejection(op: str, backend: str, inputs: Union[Inputs, torch.device],
              dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if `backend` can run `op` on these inputs (or this device and dtype), else why not."""
    why = reasons(op, backend, inputs, dtype)
    return "; ".join(why) if why else None


def explain(op: str, inputs: Union[Inputs, torch.device],
            dtype: Optional[torch.dtype] = None) -> dict[str, str]:
    """Every backend with 'usable' or the reasons it is rejected for this op and these inputs."""
    return {be: rejection(op, be, inputs, dtype) or "usable" for be in BACKENDS}


def choose(op: str, backend: str, inputs: Union[Inputs, torch.device],
           dtype: Optional[torch.dtype] = None) -> type[Backend]:
    """The backend class to run (call its `fn`): rcar_fast.ops.backend.choose among TABLE[op].
    backend="auto" takes the first of auto_order(op, device) that takes these inputs; otherwise
    the requested one, or BackendUnavailable with its reasons (all of them, for every backend
    tried, under "auto")."""
    if backend not in REQUESTABLE:
        raise ValueError(f"backend must be one of {REQUESTABLE}, got {backend!r}")
    return _backend.choose(op, _classes(op), backend, _as_inputs(inputs, dtype))
