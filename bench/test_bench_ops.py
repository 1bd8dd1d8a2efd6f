"""pytest-benchmark view of the suite: the same ops, shapes and callables as `python -m bench`
(the "pairs" sweep and the loss cases of the quick plan, or of the full plan with
RCAR_FAST_BENCH_PLAN=full), one benchmark per (op, mode, shape, backend):

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

Not part of the CI test run (pytest's testpaths is tests/); tests/test_bench_quick.py runs the
report script's tiny mode instead. Rows whose backend cannot run here are skipped with
dispatch's reason; the torch.compile baseline is left to `python -m bench --compile`.
"""
import os

import pytest
import torch

from bench import cases, flops, suite
from rcar_fast import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = (cases.full_plan(DEVICE) if os.environ.get("RCAR_FAST_BENCH_PLAN") == "full"
        else cases.quick_plan(DEVICE))


def _op_params():
    for case in PLAN.op_cases:
        for shape in case.shapes:
            if shape.sweep != "pairs":
                continue
            for mode in case.modes:
                for backend in dispatch.BACKENDS:
                    yield pytest.param(case.op, shape, mode, backend,
                                       id=f"{case.op.name}-{mode}-{shape.n_img}x{shape.n_cap}-{backend}")


def _loss_params():
    for case in PLAN.loss_cases:
        for shape in case.shapes:
            for variant in ("full", "sparse"):
                for backend in dispatch.BACKENDS:
                    yield pytest.param(case.op, shape, variant, backend,
                                       id=f"loss_{case.op.name}-{variant}-B{shape.n_img}-{backend}")


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def call():
        out = run()
        torch.cuda.synchronize(DEVICE)
        return out
    return call


def _context():
    return suite.RunContext(plan=PLAN, device=DEVICE, common={}, peak_name="", log=lambda *_: None)


def _require(op_name, backend, dtype, needs_backward):
    reason = (dispatch.rejection(op_name, backend, DEVICE, dtype)
              or suite.forward_only_reason(op_name, backend, needs_backward))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("op,shape,mode,backend", list(_op_params()))
def test_op(benchmark, op, shape, mode, backend):
    _require(op.dispatch_op, backend, shape.dtype, needs_backward=mode != "forward")
    img, cap, lens = cases.make_inputs(shape, DEVICE)
    head = suite.make_head(op, shape, DEVICE)
    fn = suite.similarity_fn(_context(), op, backend, head)
    run, reason = suite.mode_fn(mode, fn, img, cap, lens, head)
    if run is None:
        pytest.skip(reason)
    model_flops = suite.forward_flops(op, shape, lens, head) * flops.MODE_FACTOR[mode]
    benchmark.extra_info.update(flops=model_flops, pairs=shape.pairs, d=shape.d,
                                dtype=str(shape.dtype))
    benchmark.pedantic(_synchronized(run), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("op,shape,variant,backend", list(_loss_params()))
def test_loss_step(benchmark, op, shape, variant, backend):
    _require(op.dispatch_op, backend, shape.dtype, needs_backward=variant == "full")
    img, cap, lens = cases.make_inputs(shape, DEVICE)
    head = suite.make_head(op, shape, DEVICE)
    scoring = suite.op_scoring(op, head)
    model, kwargs = scoring.model, scoring.settings
    run, detail = suite.loss_step(_context(), variant, model, backend, img, cap, lens, head, kwargs)
    benchmark.extra_info.update(B=shape.n_img, detail=detail)
    benchmark.pedantic(_synchronized(run), rounds=3, warmup_rounds=1)
