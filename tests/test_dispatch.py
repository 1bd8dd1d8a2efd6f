"""Backend choice: what backends() reports on this machine, and that asking for a backend that
cannot run fails with the reason instead of silently running something else."""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from tests.inputs import make_inputs
from tests.tolerances import F64_BACKEND_AGREE, assert_close

HAS_GPU = torch.cuda.is_available()


def _inputs(dtype=torch.float32):
    return make_inputs(2, 3, 3, 4, lens=[5, 1, 3], dtype=dtype)


def test_backends_lists_every_backend_with_a_reason():
    report = rcar_fast.backends()
    assert set(report) == set(dispatch.BACKENDS)
    for name, entry in report.items():
        assert isinstance(entry["available"], bool)
        assert entry["reason"], name
        assert (entry["reason"] == "available") == entry["available"]
    assert report["reference"]["available"] and report["reference_loop"]["available"]
    assert {"gram", "scan", "rcar"} <= set(report["reference"]["ops"])
    assert "gram" in report["cpu"]["ops"] and "gram" in report["triton"]["ops"]


def test_cpu_backend_is_built_here():
    # CI builds the extension: its absence is a build failure, not something to skip past.
    assert rcar_fast.backends()["cpu"]["available"], rcar_fast.backends()["cpu"]["reason"]


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU report")
def test_cuda_reason_without_gpu():
    entry = rcar_fast.backends()["cuda"]
    assert not entry["available"]
    native = dispatch.native_module()
    if native.built_with_cuda():
        assert "no CUDA GPU" in entry["reason"]
    else:
        assert "without CUDA" in entry["reason"]


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU report")
def test_triton_runs_in_interpreter_only_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.environment_reason("triton", "cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.environment_reason("triton", "cpu")


def test_auto_never_picks_the_triton_interpreter():
    impl = dispatch.choose("gram", "auto", torch.device("cpu"), torch.float32)
    assert impl.backend == "cpu"


def test_auto_falls_back_to_reference_for_unsupported_dtype():
    # the C++ Gram kernel takes fp32/fp64 only; fp16 on CPU must go to the reference
    impl = dispatch.choose("gram", "auto", torch.device("cpu"), torch.float16)
    assert impl.backend == "reference"


def test_explicit_unusable_backend_raises_with_reason():
    with pytest.raises(dispatch.BackendUnavailable, match="dtype torch.float16 not supported"):
        rcar_fast.gram(torch.randn(1, 2, 3).half(), backend="cpu")
    if not HAS_GPU:
        with pytest.raises(dispatch.BackendUnavailable, match="cuda"):
            rcar_fast.gram(torch.randn(1, 2, 3), backend="cuda")


def test_explain_names_every_backend():
    why = dispatch.explain("gram", torch.device("cpu"), torch.float16)
    assert set(why) == set(dispatch.BACKENDS)
    assert why["reference"] == "usable"
    assert "not supported" in why["cpu"]


def test_unknown_backend_and_unknown_op():
    img, cap, lens = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        rcar_fast.scan_similarity(img, cap, lens, backend="tpu")
    assert "no implementation" in dispatch.rejection("no_such_op", "cpu", torch.device("cpu"), torch.float32)


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("gram", "opencl", lambda x: x)


def test_reference_backends_agree_on_scan():
    img, cap, lens = _inputs(torch.float64)
    a = rcar_fast.scan_similarity(img, cap, lens, backend="reference")
    b = rcar_fast.scan_similarity(img, cap, lens, backend="reference_loop")
    assert a.shape == (2, 3) and a.dtype == torch.float64
    assert_close(a, b, F64_BACKEND_AGREE)


def test_auto_skips_forward_only_backends_for_a_training_head(monkeypatch):
    """A training-mode head must get dropout and a backward pass: auto falls back to the
    reference instead of picking the forward-only CPU kernel; in eval mode it picks the kernel."""
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="coop_rcar", steps=1)
    img, cap, lens = _inputs()
    chosen = []
    real_choose = dispatch.choose

    def spy(*args, **kwargs):
        impl = real_choose(*args, **kwargs)
        chosen.append(impl.backend)
        return impl

    monkeypatch.setattr(dispatch, "choose", spy)
    head.train()
    sims = head(img, cap, lens)
    sims.sum().backward()  # would raise on the forward-only cpu kernel
    head.eval()
    with torch.no_grad():
        head(img, cap, lens)
    expected_eval = "cpu" if dispatch.rejection("rcar", "cpu", img.device, img.dtype) is None else "reference"
    assert chosen == ["reference", expected_eval]
    assert "backward" in head.train().mode_rejections()["cpu"]
    assert "dropout" in head.mode_rejections()["triton"]
    assert rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="only_rcr").train() \
        .mode_rejections().get("triton") is None


def test_explicit_backend_still_refuses_a_training_head_with_dropout():
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="only_rar", steps=1).train()
    if dispatch.rejection("rcar", "cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the C++ CPU extension is not built here (its own tests cover that case)")
    with pytest.raises(dispatch.BackendUnavailable, match="dropout"):
        head(*_inputs(), backend="cpu")
