"""Backend choice: which implementation of an op runs, and why the others do not.

Each op module (rcar_fast/ops/*.py) registers its implementations with `register`. Choosing a
backend for given tensors goes through two gates:

1. the environment: is the backend present on this machine at all (triton importable, native
   extension built, a GPU visible)? -> `environment_reason`
2. the op and the tensors: does this backend implement the op, for this device and dtype?
   -> the `supports` callable given at registration.

`backends()` reports gate 1 for every backend (and which ops each one implements);
`choose()` applies both gates and, when nothing fits, raises with every rejection reason.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "reference_loop", "triton", "cuda", "cpu")
REQUESTABLE = ("auto",) + BACKENDS

# Order tried by backend="auto": fused kernels first, the vectorised reference last. Triton is
# never chosen automatically for CPU tensors: its CPU mode is an interpreter, for testing only.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

SupportsFn = Callable[[torch.device, torch.dtype], Optional[str]]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: SupportsFn


_REGISTRY: dict[tuple[str, str], Implementation] = {}


def register(op: str, backend: str, fn: Callable, supports: Optional[SupportsFn] = None):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[(op, backend)] = Implementation(op, backend, fn, supports or (lambda dev, dt: None))


# ---------------------------------------------------------------------------------------------
# Gate 1: the environment
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def native_module():
    """The compiled extension `rcar_fast._C`, or the import error as a string."""
    try:
        return importlib.import_module("rcar_fast._C")
    except ImportError as err:  # not built, or built against another torch
        return f"native extension rcar_fast._C is not importable ({err}); build it with `pip install -e .`"


@functools.lru_cache(maxsize=None)
def triton_module():
    try:
        return importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not installed ({err})"


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def environment_reason(backend: str, device_type: Optional[str] = None) -> Optional[str]:
    """None if `backend` can run on this machine (for tensors on `device_type` when given),
    else why not."""
    if backend in ("reference", "reference_loop"):
        return None
    if backend == "triton":
        triton = triton_module()
        if isinstance(triton, str):
            return triton
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if not triton_interpreter_on():
                return ("no CUDA GPU, and TRITON_INTERPRET=1 is not set (triton's CPU "
                        "interpreter is for testing kernels on small inputs)")
        return None
    native = native_module()
    if isinstance(native, str):
        return native
    if backend == "cpu":
        if device_type not in (None, "cpu"):
            return f"the C++ CPU kernels take CPU tensors, got {device_type} tensors"
        return None
    if backend == "cuda":
        if not native.built_with_cuda():
            return "the extension was built without CUDA kernels (no nvcc at build time, or RCAR_FAST_CUDA=0)"
        if native.cuda_device_count() == 0 or not torch.cuda.is_available():
            return "CUDA kernels are built, but no CUDA GPU is visible"
        if device_type not in (None, "cuda"):
            return f"the CUDA kernels take CUDA tensors, got {device_type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def backends() -> dict[str, dict]:
    """Every backend: whether it can run here, why not, and the ops it implements.

    >>> rcar_fast.backends()["cuda"]["reason"]
    'CUDA kernels are built, but no CUDA GPU is visible'
    """
    # Importing the ops registers their implementations.
    importlib.import_module("rcar_fast.ops")
    report = {}
    for name in BACKENDS:
        reason = environment_reason(name)
        report[name] = {
            "available": reason is None,
            "reason": reason or "available",
            "ops": sorted(op for (op, be) in _REGISTRY if be == name),
        }
    return report


# ---------------------------------------------------------------------------------------------
# Gate 2: the op and the tensors
# ---------------------------------------------------------------------------------------------

def rejection(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if `backend` can run `op` on tensors of this device and dtype, else why not."""
    impl = _REGISTRY.get((op, backend))
    if impl is None:
        return f"{backend} has no implementation of {op!r}"
    reason = environment_reason(backend, device.type)
    if reason is not None:
        return reason
    return impl.supports(device, dtype)


def explain(op: str, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Every backend with 'usable' or the reason it is rejected for this op and these tensors."""
    importlib.import_module("rcar_fast.ops")
    return {be: rejection(op, be, device, dtype) or "usable" for be in BACKENDS}


def choose(op: str, backend: str, device: torch.device, dtype: torch.dtype,
           mode_rejections: Optional[dict[str, str]] = None) -> Implementation:
    """The implementation to run. backend="auto" takes the first usable one of AUTO_ORDER.

    `mode_rejections` ({backend: reason}) adds a third gate that only the caller can judge, e.g.
    a module in training mode that needs dropout and a backward pass. backend="auto" skips those
    backends; an explicitly requested one still runs, and its op raises with its own message.
    """
    importlib.import_module("rcar_fast.ops")
    if backend not in REQUESTABLE:
        raise ValueError(f"backend must be one of {REQUESTABLE}, got {backend!r}")
    if backend != "auto":
        reason = rejection(op, backend, device, dtype)
        if reason is not None:
            raise BackendUnavailable(
                f"backend {backend!r} cannot run {op} on {device.type} {dtype} tensors: {reason}")
        return _REGISTRY[(op, backend)]
    order = AUTO_ORDER.get(device.type, ("reference",))
    reasons = {}
    for candidate in order:
        reasons[candidate] = rejection(op, candidate, device, dtype)
        if reasons[candidate] is None and mode_rejections:
            reasons[candidate] = mode_rejections.get(candidate)
        if reasons[candidate] is None:
            return _REGISTRY[(op, candidate)]
    detail = "; ".join(f"{be}: {why}" for be, why in reasons.items())
    raise BackendUnavailable(f"no backend can run {op} on {device.type} {dtype} tensors ({detail})")
