"""backend="auto"'s order per op (issue 15): the CUDA RCAR kernel (plain FP32 FMA, one pair
per block) is left out of auto for the RCAR op, with its reason in rcar_fast.backends() and
in auto's error; backend="cuda" still runs it. No GPU is needed: the backends' own verdicts
on the inputs are replaced, so only dispatch's order is under test."""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.ops.rcar import RcarCuda
from rcar_fast.ops.rcar import RcarReference
from rcar_fast.ops.rcar import RcarTriton

CUDA_INPUTS = dispatch.Inputs(torch.device("cuda"), torch.float32, (2, 3, 8), (2, 4, 8), "t2i")


def _verdicts(monkeypatch, **reasons_by_class):
    """Every named backend class judges the inputs with these reasons ([]: it takes them)."""
    for cls, why in reasons_by_class.values():
        monkeypatch.setattr(cls, "not_supported_reasons", classmethod(lambda c, inputs, w=why: list(w)))


def test_auto_order_leaves_the_cuda_rcar_kernel_out_and_keeps_cuda_scan():
    assert dispatch.auto_order("rcar", "cuda") == ("triton", "reference")
    assert dispatch.auto_order("scan", "cuda") == dispatch.AUTO_ORDER["cuda"]
    assert "cuda" in dispatch.auto_order("scan", "cuda")
    assert dispatch.auto_order("rcar", "cpu") == dispatch.AUTO_ORDER["cpu"]
    assert "FP32 FMA" in dispatch.not_in_auto("rcar", "cuda")
    assert dispatch.not_in_auto("scan", "cuda") is None
    assert dispatch.not_in_auto("rcar", "no_such_backend") is None


def test_backends_report_says_why():
    caps = rcar_fast.backends()["cuda"]["capabilities"]
    assert "tensor cores" in caps["rcar"]["not_in_auto"]
    assert "not_in_auto" not in caps["scan"]
    assert "not_in_auto" not in rcar_fast.backends()["triton"]["capabilities"]["rcar"]


def test_auto_skips_a_usable_cuda_kernel(monkeypatch):
    # Pretend the CUDA kernel takes the inputs and Triton does not: auto still does not pick it.
    _verdicts(monkeypatch, cuda=(RcarCuda, []), triton=(RcarTriton, ["no triton here"]),
              reference=(RcarReference, []))
    assert dispatch.choose("rcar", "auto", CUDA_INPUTS) is RcarReference
    assert dispatch.choose("rcar", "cuda", CUDA_INPUTS) is RcarCuda


def test_auto_error_names_the_left_out_kernel_and_its_reason(monkeypatch):
    _verdicts(monkeypatch, cuda=(RcarCuda, []), triton=(RcarTriton, ["no triton here"]),
              reference=(RcarReference, ["no reference either"]))
    with pytest.raises(dispatch.BackendUnavailable) as err:
        dispatch.choose("rcar", "auto", CUDA_INPUTS)
    message = str(err.value)
    assert "triton: no triton here" in message and "reference: no reference either" in message
    assert "cuda: not tried by backend='auto' (plain FP32 FMA" in message
    assert "request it explicitly" in message
