"""Backend choice: what backends() reports on this machine, and that asking for a backend that
cannot run fails with the reason instead of silently running something else."""
import dataclasses

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.ops import backend as backend_choice
from rcar_fast.ops import gram as gram_ops
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


def test_table_rejects_a_misfiled_backend(monkeypatch):
    class SecondCpu(dispatch.Backend):
        op, backend = "gram", "cpu"

    monkeypatch.setitem(dispatch.TABLE, "gram", dispatch.TABLE["gram"] + (SecondCpu,))
    with pytest.raises(ValueError, match="repeated backend"):
        dispatch._check_table()
    monkeypatch.setitem(dispatch.TABLE, "gram", (dispatch.TABLE["scan"][0],))
    with pytest.raises(ValueError, match="wrong op"):
        dispatch._check_table()


def test_reference_backends_agree_on_scan():
    img, cap, lens = _inputs(torch.float64)
    a = rcar_fast.scan_similarity(img, cap, lens, backend="reference")
    b = rcar_fast.scan_similarity(img, cap, lens, backend="reference_loop")
    assert a.shape == (2, 3) and a.dtype == torch.float64
    assert_close(a, b, F64_BACKEND_AGREE)


def test_auto_gives_a_training_head_a_backend_with_backward_and_dropout(monkeypatch):
    """A training-mode head must get dropout and a backward pass: auto picks the C++ CPU kernel
    (fused backward, counter-based dropout) where it is built, else the reference; the fused
    GPU kernels without dropout refuse it with the reason."""
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="coop_rcar", steps=1)
    img, cap, lens = _inputs()
    chosen = []
    real_choose = backend_choice.choose

    def spy(*args, **kwargs):
        impl = real_choose(*args, **kwargs)
        chosen.append(impl.backend)
        return impl

    monkeypatch.setattr(backend_choice, "choose", spy)   # RCARSimilarity's choice
    head.train()
    sims = head(img, cap, lens)
    sims.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    with torch.no_grad():
        head(img, cap, lens)
    expected = "cpu" if dispatch.rejection("rcar", "cpu", img.device, img.dtype) is None else "reference"
    assert chosen == [expected, expected]
    training = dispatch.Inputs.of_head(head.train(), img, cap)
    if expected == "cpu":
        assert dispatch.rejection("rcar", "cpu", training) is None
    assert "dropout" in dispatch.rejection("rcar", "triton", training)
    assert "dropout" in dispatch.rejection("rcar", "cuda", training) or not dispatch.explain(
        "rcar", training)["cuda"].startswith("the CUDA RCAR")
    only_rcr = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="only_rcr").train()
    assert "dropout" not in (dispatch.rejection("rcar", "triton", dispatch.Inputs.of_head(only_rcr, img, cap)) or "")


def test_explicit_backend_still_refuses_a_training_head_with_dropout():
    head = rcar_fast.RCARSimilarity(embed_dim=4, sim_dim=8, regulator="only_rar", steps=1).train()
    training = dispatch.Inputs.of_head(head, *_inputs()[:2])
    # the Triton kernel: a backward but no dropout
    assert "dropout is active" in dispatch.rejection("rcar", "triton", training)


def test_auto_error_lists_every_backend_and_its_reasons(monkeypatch):
    inputs = dispatch.Inputs(torch.device("cpu"), torch.complex64)
    with pytest.raises(dispatch.BackendUnavailable) as err:
        dispatch.choose("gram", "cpu", inputs)
    assert "complex64" in str(err.value)
    # dispatch.AUTO_ORDER is ops.backend.AUTO_ORDER, the one order (the wrappers' too)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("cpu", "triton"))
    with pytest.raises(dispatch.BackendUnavailable, match=r"no backend can run gram.*cpu: .*triton: "):
        dispatch.choose("gram", "auto", inputs)
    with pytest.raises(dispatch.BackendUnavailable, match=r"no backend can run gram.*cpu: .*triton: "):
        backend_choice.choose("gram", gram_ops.BACKENDS["gram"], "auto", inputs)


def test_the_wrappers_names_are_the_tables():
    """The op modules' wrappers check backend= against ops.backend.REQUESTABLE (they cannot
    import dispatch): the same names as dispatch's, which come from TABLE."""
    assert set(dispatch.REQUESTABLE) == set(backend_choice.REQUESTABLE)
    assert dispatch.TABLE == {op: classes for family in dispatch.OP_FAMILIES
                              for op, classes in family.items()}
    for family in dispatch.OP_FAMILIES:
        for op, classes in family.items():
            assert all(cls.op == op for cls in classes), op


def test_auto_falls_back_past_a_shape_limit():
    """The C++ kernels refuse a t2i image whose Gram exceeds their limit: auto then takes the
    reference, on the same inputs that the cpu backend's reasons name."""
    from rcar_fast.ops import scan as scan_ops

    if dispatch.rejection("scan", "cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the C++ CPU extension is not built here")
    R = scan_ops._largest_region_count(4) + 1
    big = dispatch.Inputs(torch.device("cpu"), torch.float32, (1, R, 4), (1, 3, 4), "t2i")
    assert "Gram" in dispatch.rejection("scan", "cpu", big)
    assert dispatch.choose("scan", "auto", big).backend == "reference"
    assert dispatch.choose("scan", "auto", dataclasses.replace(big, direction="i2t")).backend == "cpu"
    with pytest.raises(dispatch.BackendUnavailable, match="Gram"):
        dispatch.choose("scan_pairs", "cpu", big)


def test_a_new_backend_is_one_class_and_one_table_entry(monkeypatch):
    """What adding a backend takes in Python: its class (with its own environment probe) and
    its place in TABLE (and AUTO_ORDER); backends(), explain() and choose() follow."""
    class GramNumpy(dispatch.Backend):
        op, backend, kernel = "gram", "numpy", "the NumPy Gram"
        dtypes = {"cpu": (torch.float64,)}

        @classmethod
        def environment(cls, device_type=None):
            return None

        @staticmethod
        def fn(x):
            return torch.from_numpy(x.numpy() @ x.numpy().transpose(0, 2, 1))

    monkeypatch.setitem(dispatch.TABLE, "gram", dispatch.TABLE["gram"] + (GramNumpy,))
    monkeypatch.setattr(dispatch, "_BY_KEY", dispatch._check_table())
    monkeypatch.setattr(dispatch, "BACKENDS", dispatch.BACKENDS + ("numpy",))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("numpy", "reference"))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert dispatch.choose("gram", "auto", dispatch.Inputs.of_tensor(x)) is GramNumpy
    assert dispatch.choose("gram", "auto", dispatch.Inputs.of_tensor(x.float())).backend == "reference"
    assert "float32" in dispatch.explain("gram", torch.device("cpu"), torch.float32)["numpy"]
    assert rcar_fast.backends()["numpy"] == {"available": True, "reason": "available", "ops": ["gram"],
                                             "capabilities": {"gram": GramNumpy.capabilities()}}
    torch.testing.assert_close(GramNumpy.fn(x), torch.bmm(x, x.transpose(1, 2)))


def test_backends_report_capabilities():
    report = rcar_fast.backends()
    assert report["cpu"]["capabilities"]["rcar"]["has_backward"] is True
    assert report["cpu"]["capabilities"]["rcar"]["implements_dropout"] is True
    assert report["cpu"]["capabilities"]["scan"]["has_backward"] is True
    assert report["triton"]["capabilities"]["rcar"]["implements_dropout"] is False
    assert report["reference"]["capabilities"]["rcar"]["implements_dropout"] is True


def test_backend_modules_do_not_import_dispatch():
    """One direction: dispatch imports the backend modules (its TABLE), never the reverse."""
    import ast
    import pathlib

    ops = pathlib.Path(rcar_fast.__file__).parent / "ops"
    wrappers = {"scan.py", "gram.py", "maxsim.py", "scorer.py"}   # above dispatch
    for path in ops.glob("*.py"):
        if path.name in wrappers:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("rcar_fast.dispatch")
                           or n in ("rcar_fast.ops.scan", "rcar_fast.ops.gram", "rcar_fast.ops.maxsim")
                           for n in names), f"{path.name} imports {names}"
