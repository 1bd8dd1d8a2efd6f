"""RCAR similarity head, all pairs: reference registrations. Fused implementations register
under the op name "rcar" (rcar_triton.py, rcar_cpu.py, rcar_cuda.py) with the signature

    fn(head, img, cap, lens) -> (n_img, n_cap)

where `head` is the RCARSimilarity module (weights under the official names, plus regulator,
steps, direction, smooth) and `lens` arrives validated (int64 on cap's device)."""
import torch

from rcar_fast import dispatch


def _output_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_vectorized(head, img, cap, lens):
    return head.forward_vectorized(img, cap, lens).to(_output_dtype(img.dtype))


def _reference_loop(head, img, cap, lens):
    return head.forward_loop(img, cap, lens).to(_output_dtype(img.dtype))


dispatch.register("rcar", "reference", _reference_vectorized)
dispatch.register("rcar", "reference_loop", _reference_loop)
