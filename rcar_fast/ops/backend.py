"""What every backend of every op shares: the environment probes (the one place the native
library and triton are loaded, never raising at import), the description of a call's inputs
that a backend judges, the Backend base class and the bases of the backend kinds (C++ CPU,
Triton, the CUDA tile kernels), and the choice among an op's backends (`choose`, with
AUTO_ORDER: the order backend="auto" tries).

A backend is a small class (one per op and backend, in the op's backend module) that says
`not_supported_reasons(inputs) -> list[str]` over the full inputs: the environment, device,
dtype, shapes, whether a backward pass will be needed, active dropout. An empty list means it
can run them. Each op module (rcar_fast/ops/<op>.py) lists its classes in BACKENDS and its
public wrapper chooses among them with `choose`; rcar_fast.dispatch assembles every op
module's BACKENDS into its TABLE (choice by op name, backends(), explain()).

This module imports nothing of rcar_fast but the contract: the op modules import it, dispatch
imports them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import ClassVar, Optional, Sequence

import torch

from rcar_fast import contract

# The backend names of the project, what backend= may request besides "auto" (a new backend
# name is added here, in AUTO_ORDER if auto should try it, and its class overrides
# Backend.environment).
BACKEND_NAMES = ("reference", "reference_loop", "triton", "cuda", "cpu")
REQUESTABLE = ("auto",) + BACKEND_NAMES

# Order tried by backend="auto": fused kernels first, the vectorised reference last. Triton is
# never chosen automatically for CPU tensors: its CPU mode is an interpreter, for testing only.
# A backend class may also leave itself out of auto's order for its op with a reason
# (`not_in_auto`, e.g. the CUDA RCAR kernel: slower than Triton); auto_order() applies it, and
# backends() and auto's errors show the reason. An explicit backend= still runs it.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


# ---------------------------------------------------------------------------------------------
# The environment: is a backend present on this machine at all?
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def native_module():
    """The compiled extension `rcar_fast._C`, or the import error as a string (never raises)."""
    try:
        return importlib.import_module("rcar_fast._C")
    except ImportError as err:  # not built, or built against another torch
        return f"native extension rcar_fast._C is not importable ({err}); build it with `pip install -e .`"


def native():
    """The extension module, for a backend that already checked it is importable."""
    module = native_module()
    if isinstance(module, str):
        raise BackendUnavailable(module)
    return module


@functools.lru_cache(maxsize=None)
def triton_module():
    try:
        return importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not installed ({err})"


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# A fact about the machine, constant for the process: torch.compile takes the answer as a
# constant instead of tracing the imports behind it.
@torch.compiler.assume_constant_result
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
    module = native_module()
    if isinstance(module, str):
        return module
    if backend == "cpu":
        if device_type not in (None, "cpu"):
            return f"the C++ CPU kernels take CPU tensors, got {device_type} tensors"
        return None
    if backend == "cuda":
        if not module.built_with_cuda():
            return "the extension was built without CUDA kernels (no nvcc at build time, or RCAR_FAST_CUDA=0)"
        if module.cuda_device_count() == 0 or not torch.cuda.is_available():
            return "CUDA kernels are built, but no CUDA GPU is visible"
        if device_type not in (None, "cuda"):
            return f"the CUDA kernels take CUDA tensors, got {device_type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# The inputs a backend judges
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything about one call that decides which backend can take it. Only device and dtype
    are required (backends() and the tests ask with those alone); a wrapper fills in the rest.

    needs_grad: a backward pass will follow (autograd records and a differentiable input, or
    for a head: training mode with autograd on). active_dropout: names of the dropout modules
    that act in this call."""
    device: torch.device
    dtype: torch.dtype
    img_shape: Optional[tuple] = None     # (n_img, R, d)
    cap_shape: Optional[tuple] = None     # (n_cap, Lmax, d)
    direction: Optional[str] = None
    needs_grad: bool = False
    active_dropout: tuple = ()
    lens: Optional[torch.Tensor] = dataclasses.field(default=None, compare=False, repr=False)

    def longest_caption(self) -> Optional[int]:
        """The longest real caption, read from lens when a backend asks (a host read on a GPU);
        None when lens is not given or not readable (inside torch.compile): then at most Lmax."""
        if self.lens is None or self.lens.numel() == 0 or torch.compiler.is_compiling():
            return None
        return int(self.lens.max())

    def tile_extent(self) -> Optional[tuple]:
        """(regions, longest caption) a kernel's tile must hold, the padded length Lmax
        standing in when lens is not read; None when the shapes are not known."""
        if self.img_shape is None or self.cap_shape is None:
            return None
        longest = self.longest_caption()
        return self.img_shape[1], self.cap_shape[1] if longest is None else longest

    @classmethod
    def of_scan(cls, img: torch.Tensor, cap: torch.Tensor, direction: str,
                lens: Optional[torch.Tensor] = None) -> "Inputs":
        needs_grad = torch.is_grad_enabled() and (img.requires_grad or cap.requires_grad)
        return cls(img.device, img.dtype, tuple(img.shape), tuple(cap.shape), direction,
                   needs_grad, (), lens)

    @classmethod
    def of_head(cls, head, img: torch.Tensor, cap: torch.Tensor,
                lens: Optional[torch.Tensor] = None) -> "Inputs":
        # A head in training mode is taking a training step; an eval-mode head's result may
        # still be differentiated, and a forward-only backend's result then raises when it is.
        needs_grad = bool(head.training) and torch.is_grad_enabled()
        return cls(img.device, img.dtype, tuple(img.shape), tuple(cap.shape), head.direction,
                   needs_grad, tuple(head.active_dropout()), lens)

    @classmethod
    def of_tensor(cls, x: torch.Tensor) -> "Inputs":
        return cls(x.device, x.dtype, tuple(x.shape))


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


class Backend:
    """One backend of one op. Subclasses set the class attributes and `fn`, and add their
    own limits in `extra_reasons`; the base judges environment, device, dtype, backward and
    dropout from the attributes, so that every refusal reads alike and is found in one place.
    """
    op: ClassVar[str]
    backend: ClassVar[str]                       # its name (dispatch.BACKENDS lists them all)
    kernel: ClassVar[str] = ""                   # how messages name it ("the C++ CPU kernels")
    dtypes: ClassVar[dict] = {}                  # device type -> dtypes taken; {} = any
    has_backward: ClassVar[bool] = True
    implements_dropout: ClassVar[bool] = True

    @staticmethod
    def fn(*args, **kwargs):  # the implementation, with the op's signature (see dispatch)
        raise NotImplementedError

    @classmethod
    def environment(cls, device_type: Optional[str] = None) -> Optional[str]:
        """Why this backend is absent on this machine (None: present). The built-in backends
        share the probes of environment_reason; a new backend overrides this."""
        return environment_reason(cls.backend, device_type)

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        env = cls.environment(inputs.device.type)
        if env is not None:
            return [env]   # nothing else can be judged for a backend that is not here
        reasons = []
        dtype_reason = cls.dtype_reason(inputs.device.type, inputs.dtype)
        if dtype_reason is not None:
            reasons.append(dtype_reason)
        if inputs.needs_grad and not cls.has_backward:
            reasons.append(f"{cls.kernel}: forward only (eval mode), but a backward pass is "
                           "needed (training mode with autograd on); use backend='reference' to train")
        if inputs.active_dropout and not cls.implements_dropout:
            reasons.append(f"{cls.kernel}: no dropout, but dropout is active in training mode "
                           f"({inputs.active_dropout[0]}); call head.eval() for scoring, or use "
                           "backend='reference' to train with dropout")
        if not reasons:
            reasons += cls.extra_reasons(inputs)
        return reasons

    @classmethod
    def dtype_reason(cls, device_type: str, dtype: torch.dtype) -> Optional[str]:
        """Why this device / dtype is refused (None: taken); override for a kinder message."""
        if not cls.dtypes:
            return None
        taken = cls.dtypes.get(device_type)
        if taken is None:
            return f"{cls.kernel}: runs on {'/'.join(cls.dtypes)} tensors, got {device_type} tensors"
        if dtype not in taken:
            return f"{cls.kernel}: dtype {dtype} not supported on {device_type} (takes {_dtype_names(taken)})"
        return None

    @classmethod
    def extra_reasons(cls, inputs: Inputs) -> list[str]:
        """Limits of this backend beyond device / dtype / backward / dropout (shapes)."""
        return []

    @classmethod
    def capabilities(cls) -> dict:
        return {"has_backward": cls.has_backward, "implements_dropout": cls.implements_dropout,
                "dtypes": {dev: [str(d).replace("torch.", "") for d in dts]
                           for dev, dts in cls.dtypes.items()} or "any"}


class CpuKernelBackend(Backend):
    """What the C++ CPU backends share: CPU tensors in float32 or float64 (the kernels'
    compute types), refused otherwise with what to do instead."""
    backend, kernel = "cpu", "the C++ CPU kernels"
    dtypes = {"cpu": (torch.float32, torch.float64)}

    @classmethod
    def dtype_reason(cls, device_type, dtype):
        if device_type != "cpu":
            return f"{cls.kernel} take CPU tensors, got {device_type} tensors"
        if dtype not in cls.dtypes["cpu"]:
            return (f"{cls.kernel} compute in float32 or float64, got {dtype} "
                    "(cast the inputs, or use backend='reference')")
        return None


class TritonBackend(Backend):
    """What the Triton SCAN and head backends share: fp32/fp16/bf16 on CUDA; under triton's
    CPU interpreter (tests) fp32/fp16 and float64 (for gradcheck), but not bfloat16."""
    backend = "triton"
    dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16),
              "cpu": (torch.float32, torch.float16, torch.float64)}

    @classmethod
    def dtype_reason(cls, device_type, dtype):
        if device_type == "cpu" and dtype == torch.bfloat16:
            return ("bfloat16 is not supported under triton's CPU interpreter (its bf16 tl.dot "
                    "is wrong); use float32/float16 on CPU, or a CUDA GPU")
        return super().dtype_reason(device_type, dtype)


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The CUDA kernels: streams and rows; the tile (SCAN's and the S-only heads'): shapes, caption groups
# ---------------------------------------------------------------------------------------------

CUDA_DTYPE_CODES = {getattr(torch, name): code for name, code in contract.CUDA_DTYPE_CODES.items()}
# Tile shapes of the kernels, widest caption groups first (see scan_tile_rows / scan_tile_cols).
COL_FRAGS = (8, 4, 2)


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of `device`, as the launchers take it."""
    return torch.cuda.current_stream(device).cuda_stream


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The native kernels index rows with arbitrary strides but read each feature vector
    # contiguously.
    return x if x.stride(2) == 1 else x.contiguous()


def tile_shape_rejection(R: int, max_len: int, tile_rows=None, tile_cols=None, kernel: str = "SCAN",
                         instead: str = "'triton' or 'reference'") -> Optional[str]:
    """Why no tile shape of the CUDA `kernel` holds R regions and a caption of max_len words
    (None if one does); `instead`: the backends to use then."""
    tile_rows = tile_rows or native().scan_tile_rows
    tile_cols = tile_cols or native().scan_tile_cols
    if any(R <= tile_rows(c) and max_len <= tile_cols(c) for c in COL_FRAGS):
        return None
    limits = ", ".join(f"R <= {tile_rows(c)} with captions <= {tile_cols(c)} words" for c in COL_FRAGS)
    return (f"the CUDA {kernel} kernel's tile cannot hold R={R} regions with a caption of {max_len} words "
            f"(supported: {limits}); use backend={instead}")


def tile_col_frags(R: int, max_len: int, tile_rows=None, tile_cols=None, **why) -> int:
    """The tile shape (col_frags) whose rows hold R regions and whose columns hold the longest
    caption; raises BackendUnavailable (tile_shape_rejection's reason, `why` its wording) when
    no tile shape fits."""
    tile_rows = tile_rows or native().scan_tile_rows
    tile_cols = tile_cols or native().scan_tile_cols
    for col_frags in COL_FRAGS:
        if R <= tile_rows(col_frags) and max_len <= tile_cols(col_frags):
            return col_frags
    raise BackendUnavailable(tile_shape_rejection(R, max_len, tile_rows, tile_cols, **why))


def caption_groups(lens: list[int], capacity: int) -> list[int]:
    """Greedy cut of consecutive captions into groups of at most `capacity` words:
    the first caption of each group, then len(lens)."""
    first, used = [0], 0
    for j, n_words in enumerate(lens):
        if used + n_words > capacity:
            first.append(j)
            used = 0
        used += n_words
    first.append(len(lens))
    return first


class CudaTileBackend(Backend):
    """What the CUDA SCAN and maxsim backends share: their dtypes, and a tile that must hold R
    regions and the longest caption (when the wrapper did not read the lengths, the padded
    length Lmax bounds it), judged by `tile_reason`."""
    backend = "cuda"
    dtypes = {"cuda": tuple(CUDA_DTYPE_CODES)}

    @classmethod
    def tile_reason(cls, inputs: Inputs, regions: int, longest: int) -> Optional[str]:
        return tile_shape_rejection(regions, longest)

    @classmethod
    def extra_reasons(cls, inputs: Inputs) -> list:
        extent = inputs.tile_extent()
        reason = extent and cls.tile_reason(inputs, *extent)
        return [reason] if reason else []


# ---------------------------------------------------------------------------------------------
# The choice among an op's backends
# ---------------------------------------------------------------------------------------------

def find(classes: Sequence[type[Backend]], backend: str) -> Optional[type[Backend]]:
    """The class of `classes` named `backend` (None if the op has none)."""
    return next((cls for cls in classes if cls.backend == backend), None)


def not_in_auto(cls: Optional[type[Backend]]) -> Optional[str]:
    """Why backend="auto" never tries this class (None: it does, in AUTO_ORDER's order)."""
    note = getattr(cls, "not_in_auto", None)
    return note() if callable(note) else note   # a string, or a classmethod that decides


def reasons(op: str, classes: Sequence[type[Backend]], backend: str, inputs: Inputs) -> list[str]:
    """Why `backend` cannot run `op` (its classes `classes`) on these inputs ([] if it can)."""
    cls = find(classes, backend)
    if cls is None:
        return [f"{backend} has no implementation of {op!r}"]
    return cls.not_supported_reasons(inputs)


def _describe(inputs: Inputs) -> str:
    return f"{inputs.device.type} {inputs.dtype} tensors"


def choose(op: str, classes: Sequence[type[Backend]], backend: str, inputs: Inputs) -> type[Backend]:
    """The class of `classes` (op's backends) to run (call its `fn`). backend="auto" takes the
    first of AUTO_ORDER[device] that takes these inputs; otherwise the requested one, or
    BackendUnavailable with its reasons (all of them, for every backend tried, under "auto")."""
    if backend not in REQUESTABLE and find(classes, backend) is None:
        raise ValueError(f"backend must be one of {REQUESTABLE}, got {backend!r}")
    if backend != "auto":
        why = reasons(op, classes, backend, inputs)
        if why:
            raise BackendUnavailable(f"backend {backend!r} cannot run {op} on {_describe(inputs)}: "
                                     + "; ".join(why))
        return find(classes, backend)
    tried = {}
    for candidate in AUTO_ORDER.get(inputs.device.type, ("reference",)):
        skipped = not_in_auto(find(classes, candidate))
        if skipped:
            tried[candidate] = f"not tried by backend='auto' ({skipped}); request it explicitly"
            continue
        why = reasons(op, classes, candidate, inputs)
        if not why:
            return find(classes, candidate)
        tried[candidate] = "; ".join(why)
    detail = "; ".join(f"{be}: {why}" for be, why in tried.items())
    raise BackendUnavailable(f"no backend can run {op} on {_describe(inputs)} ({detail})")
