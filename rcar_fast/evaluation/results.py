"""Saved results: a bare (n_img, n_cap) matrix, or the public ``{'npts', 'sims'}`` dict (the
results_{data_name}.npy that the public RCAR evalrank writes and eval_ensemble reads), written
atomically and read back with checks (the dict's pickle only through a restricted unpickler).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from rcar_fast import data

# "matrix": np.save of the (n_img, n_cap) matrix; "public": np.save of
# {'npts': n_img, 'sims': float64 matrix}, the results_{data_name}.npy that the public RCAR
# evalrank writes and eval_ensemble reads.
RESULT_FORMATS = ("matrix", "public")


def save_results(path, sims, fmt: str = "matrix") -> None:
    """Writes a similarity matrix atomically in one of RESULT_FORMATS."""
    if fmt not in RESULT_FORMATS:
        raise ValueError(f"format must be one of {RESULT_FORMATS}, got {fmt!r}")
    array = sims.detach().cpu().numpy() if isinstance(sims, torch.Tensor) else np.asarray(sims)
    if fmt == "public":
        data.save_npy(path, {"npts": int(array.shape[0]), "sims": array.astype(np.float64)})
    else:
        data.save_npy(path, array)


def load_results(path, captions_per_image: int = 5) -> np.ndarray:
    """A saved similarity matrix: a bare .npy matrix (memory-mapped) or the public
    ``{'npts', 'sims'}`` dict (as the public eval_ensemble reads it; its pickle is loaded
    only for that layout, a dict of an int and an array). Raises ValueError naming the
    file for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    if _holds_a_pickle(path):
        sims = _load_public_results(path)
    else:
        sims = data.load_npy(path, mmap=True)
    if sims.ndim != 2 or not (np.issubdtype(sims.dtype, np.floating)):
        raise ValueError(f"{path} must hold a floating (n_img, n_cap) similarity matrix, got "
                         f"dtype {sims.dtype} and shape {sims.shape}")
    if sims.shape[1] != captions_per_image * sims.shape[0]:
        raise ValueError(f"{path} holds a {sims.shape} matrix; expected (n_img, "
                         f"{captions_per_image} * n_img)")
    return sims


def _holds_a_pickle(path) -> bool:
    """Whether a .npy file stores a pickled object (dtype object) rather than numbers."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            _, _, dtype = _read_header(version)(f)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy file: {err}") from None
    return dtype.hasobject


def _read_header(version):
    return (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)


def _load_public_results(path):
    try:
        with open(path, "rb") as f:
            content = _PublicResultsUnpickler.load_npy(f)
    except (pickle.UnpicklingError, ValueError, EOFError, AttributeError, ImportError) as err:
        raise ValueError(f"{path} is neither a similarity matrix nor the public "
                         f"{{'npts', 'sims'}} results dict ({type(err).__name__}: {err})") from None
    if isinstance(content, np.ndarray) and content.shape == () and content.dtype.hasobject:
        content = content.item()             # np.save wraps the dict in a 0-d object array
    if not (isinstance(content, dict) and set(content) == {"npts", "sims"}
            and isinstance(content["sims"], np.ndarray)):
        raise ValueError(f"{path} holds a pickled object that is not the public "
                         f"{{'npts', 'sims'}} results dict")
    sims, npts = content["sims"], content["npts"]
    if sims.ndim != 2 or int(npts) != sims.shape[0]:
        raise ValueError(f"{path}: npts = {npts} but sims has shape {sims.shape}")
    return sims


class _PublicResultsUnpickler:
    """Reads np.save({'npts', 'sims'}) without running arbitrary pickles: only the numpy
    array reconstruction and scalar types are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    @classmethod
    def load_npy(cls, f):
        shape, _, dtype = _read_header(np.lib.format.read_magic(f))(f)
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(f"expected a pickled object, got dtype {dtype} shape {shape}")
        allowed = cls._ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in allowed:
                    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
                return super().find_class(module, name)

        return Restricted(f).load()
