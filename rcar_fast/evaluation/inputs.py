"""Argument checks of the all-pairs entry points, run before anything is allocated or
written: the arrays, the block sizes, k, an ``out`` array and the compute device.

Caption lengths are checked by ``rcar_fast.validate.lengths`` (the project's one lens check);
this module only adds what streaming needs on top: NumPy arrays / memmaps as features, and
the lengths on the CPU (they index host-side blocks).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from rcar_fast import validate

ArrayLike = Union[torch.Tensor, np.ndarray]


def check_inputs(img, cap, lens) -> torch.Tensor:
    """Checks (img, cap, lens); returns lens as a CPU int64 tensor."""
    for name, x, doc in (("img", img, "(n_img, R, d)"), ("cap", cap, "(n_cap, Lmax, d)")):
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape {doc}, "
                            f"got {type(x).__name__}")
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"{name} must have a non-empty shape {doc}, got {tuple(x.shape)}")
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"img and cap must share the feature size d, got img {tuple(img.shape)} "
                         f"and cap {tuple(cap.shape)}")
    # Lengths may live on any device here (blocks are moved one by one), so they are checked
    # where they are and then brought to the CPU.
    where = lens.device if isinstance(lens, torch.Tensor) else torch.device("cpu")
    return validate.lengths(lens, cap.shape[0], cap.shape[1], where).cpu()


def check_blocks(img_block, cap_block, device: torch.device) -> tuple:
    """(img_block, cap_block) as ints; defaults 256 x 2048 on a GPU, 64 x 512 on a CPU."""
    gpu = device.type == "cuda"
    img_block = (256 if gpu else 64) if img_block is None else img_block
    cap_block = (2048 if gpu else 512) if cap_block is None else cap_block
    for name, value in (("img_block", img_block), ("cap_block", cap_block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(img_block), int(cap_block)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_out(out, shape: tuple) -> None:
    """An ``out`` array to fill: a floating tensor or array of the result's shape."""
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TypeError(f"out must be a torch.Tensor or numpy array of shape {shape}, "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape (n_img, n_cap) = {shape}, got {tuple(out.shape)}")
    floating = (out.dtype.is_floating_point if isinstance(out, torch.Tensor)
                else np.issubdtype(out.dtype, np.floating))
    if not floating:
        raise TypeError(f"out must be a floating array, got dtype {out.dtype}")


def result_dtype(img, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The result's dtype: float64 for float64 inputs, else float32 (unless given)."""
    if dtype is not None:
        return dtype
    return torch.float64 if img.dtype in (torch.float64, np.float64) else torch.float32


def resolve_device(device) -> torch.device:
    """The compute device (default: cuda if available, else cpu); refuses a CUDA device
    that this machine does not have."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here (no GPU "
                             f"or a CPU-only torch); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device
