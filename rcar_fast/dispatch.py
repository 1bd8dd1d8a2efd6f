"""Backend choice: which implementation of an op runs, and why the others do not.

TABLE below is the whole registry: for every op, its backend classes (rcar_fast/ops/*, one
small class per op and backend, see rcar_fast.ops.backend.Backend). Each class judges the
full inputs of a call (rcar_fast.ops.backend.Inputs: environment, device, dtype, shapes,
whether a backward follows, active dropout) in `not_supported_reasons`. `choose` runs the
requested backend or, for backend="auto", the first of AUTO_ORDER that takes the inputs;
when none does (or the requested one does not), one BackendUnavailable lists every
backend's reasons, before any kernel runs. `backends()` reports, per backend, whether it is
present on this machine and what it implements.

Layering: wrappers (rcar_fast.ops.scan, ops.gram, modules, pairs) -> dispatch -> the backend
modules -> kernels / the native extension. The backend modules never import this module.

Adding a backend (say "foo" for SCAN) touches:
  1. the kernel: kernels/foo.py (Triton) or csrc/... (+ csrc/bindings.cpp for native code);
  2. rcar_fast/ops/scan_foo.py: class ScanFoo(Backend) with its dtypes, capability flags
     (has_backward, implements_dropout), extra_reasons (shape limits), environment (whether
     "foo" is present here) and fn, the kernel wrapped as a custom op with
     ops.library.define_scan_op (forward, backward; fake and autograd come with it);
  3. this module: ScanFoo in TABLE["scan"] (and "foo" in AUTO_ORDER if auto should try it);
  4. tests/test_scan_foo.py (numerics against the float64 reference; opcheck of the op).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from rcar_fast.ops import (gram_backends, maxsim_cpu, maxsim_cuda, maxsim_reference,
                           maxsim_triton, pair_backends, rcar_cpu, rcar_cuda, rcar_reference,
                           rcar_triton, scan_cpu, scan_cuda, scan_reference, scan_triton)
from rcar_fast.ops.backend import (Backend, BackendUnavailable, Inputs,  # noqa: F401
                                   environment_reason, native_module, triton_interpreter_on,
                                   triton_module)

# Order tried by backend="auto": fused kernels first, the vectorised reference last. Triton is
# never chosen automatically for CPU tensors: its CPU mode is an interpreter, for testing only.
# A backend class may also leave itself out of auto's order for its op with a reason
# (`not_in_auto`, e.g. the CUDA RCAR kernel: slower than Triton); auto_order() applies it, and
# backends() and auto's errors show the reason. An explicit backend= still runs it.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# op -> its backend classes (BACKENDS, the requestable names, follow from it). Adding a
# backend: write its class beside the op's others (rcar_fast/ops/<op>_<backend>.py; a backend
# new to the project also overrides Backend.environment there) and list it here (and in
# AUTO_ORDER if backend="auto" should try it).
TABLE: dict[str, tuple[type[Backend], ...]] = {
    "gram": (gram_backends.GramReference, gram_backends.GramReferenceLoop, gram_backends.GramTriton,
             gram_backends.GramCuda, gram_backends.GramCpu),
    "scan": (scan_reference.ScanReference, scan_reference.ScanReferenceLoop,
             scan_triton.ScanTriton, scan_cuda.ScanCuda, scan_cpu.ScanCpu),
    "rcar": (rcar_reference.RcarReference, rcar_reference.RcarReferenceLoop,
             rcar_triton.RcarTriton, rcar_cuda.RcarCuda, rcar_cpu.RcarCpu),
    "scan_pairs": (pair_backends.ScanPairsReference, pair_backends.ScanPairsReferenceLoop,
                   pair_backends.ScanPairsCpu),
    "rcar_pairs": (pair_backends.RcarPairsReference, pair_backends.RcarPairsReferenceLoop,
                   pair_backends.RcarPairsCpu),
    "maxsim": (maxsim_reference.MaxSimReference, maxsim_reference.MaxSimReferenceLoop,
               maxsim_triton.MaxSimTriton, maxsim_cuda.MaxSimCuda, maxsim_cpu.MaxSimCpu),
    "maxsim_pairs": (maxsim_reference.MaxSimPairsReference,
                     maxsim_reference.MaxSimPairsReferenceLoop, maxsim_triton.MaxSimPairsTriton,
                     maxsim_cuda.MaxSimPairsCuda, maxsim_cpu.MaxSimPairsCpu),
}


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
REQUESTABLE = ("auto",) + BACKENDS


def implementation(op: str, backend: str) -> Optional[type[Backend]]:
    return _BY_KEY.get((op, backend))


def not_in_auto(op: str, backend: str) -> Optional[str]:
    """Why backend="auto" never tries `backend` for `op` (None: it does, in AUTO_ORDER)."""
    note = getattr(implementation(op, backend), "not_in_auto", None)
    return note() if callable(note) else note   # a string, or a classmethod that decides


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


def reasons(op: str, backend: str, inputs: Union[Inputs, torch.device],
            dtype: Optional[torch.dtype] = None) -> list[str]:
    """Why `backend` cannot run `op` on these inputs ([] if it can)."""
    cls = implementation(op, backend)
    if cls is None:
        return [f"{backend} has no implementation of {op!r}"]
    return cls.not_supported_reasons(_as_inputs(inputs, dtype))


def rejection(op: str, backend: str, inputs: Union[Inputs, torch.device],
              dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if `backend` can run `op` on these inputs (or this device and dtype), else why not."""
    why = reasons(op, backend, inputs, dtype)
    return "; ".join(why) if why else None


def explain(op: str, inputs: Union[Inputs, torch.device],
            dtype: Optional[torch.dtype] = None) -> dict[str, str]:
    """Every backend with 'usable' or the reasons it is rejected for this op and these inputs."""
    return {be: rejection(op, be, inputs, dtype) or "usable" for be in BACKENDS}


def _describe(inputs: Inputs) -> str:
    return f"{inputs.device.type} {inputs.dtype} tensors"


def choose(op: str, backend: str, inputs: Union[Inputs, torch.device],
           dtype: Optional[torch.dtype] = None) -> type[Backend]:
    """The backend class to run (call its `fn`). backend="auto" takes the first of
    auto_order(op, device) that takes these inputs; otherwise the requested one, or BackendUnavailable with its
    reasons (all of them, for every backend tried, under "auto")."""
    if backend not in REQUESTABLE:
        raise ValueError(f"backend must be one of {REQUESTABLE}, got {backend!r}")
    inputs = _as_inputs(inputs, dtype)
    if backend != "auto":
        why = reasons(op, backend, inputs)
        if why:
            raise BackendUnavailable(f"backend {backend!r} cannot run {op} on {_describe(inputs)}: "
                                     + "; ".join(why))
        return _BY_KEY[(op, backend)]
    tried = {}
    for candidate in AUTO_ORDER.get(inputs.device.type, ("reference",)):
        skipped = not_in_auto(op, candidate)
        if skipped:
            tried[candidate] = f"not tried by backend='auto' ({skipped}); request it explicitly"
            continue
        why = reasons(op, candidate, inputs)
        if not why:
            return _BY_KEY[(op, candidate)]
        tried[candidate] = "; ".join(why)
    detail = "; ".join(f"{be}: {why}" for be, why in tried.items())
    raise BackendUnavailable(f"no backend can run {op} on {_describe(inputs)} ({detail})")
