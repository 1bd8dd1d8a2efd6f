"""Test configuration: which Triton mode the session runs in, and the two markers that follow.

Triton decides between its CPU interpreter and GPU compilation when a kernel is *decorated*
(`@triton.jit` reads TRITON_INTERPRET at import of kernels/*.py) and again when it compiles, so
the mode is fixed for the whole session and must be set here, before any test module imports a
kernel module:

* no GPU: TRITON_INTERPRET=1 (unless set otherwise), the Triton kernels run interpreted on CPU
  tensors; tests marked `gpu` skip.
* a GPU: the interpreter stays off, the Triton kernels compile for the GPU; the `gpu` tests run
  and the `interpreter` tests (CPU tensors through backend="triton", interpreter-only tile
  paths, float64) skip with the reason. `pytest -m gpu` runs the GPU tests alone.

RCAR_FAST_AUTOTUNE=quick (unless set otherwise) limits the Triton autotuners to 1-2 configs: the
tests check results, not speed, and full autotuning costs seconds of compile per config.
RCAR_FAST_FULL_TESTS=1 runs the exhaustive sweeps (FULL_TESTS): every combination of the
settings grids and every sm_90 configuration (tests/test_sm90_compile.py). By default the grids
are pairwise-covering subsets (every value of every setting, and every pair of values of two
settings, at least once: tests/maxsim_cases.py settings_grid), so each code path still runs.
RCAR_FAST_TEST_DEADLINE (a Unix time; scripts/gpu_check.sh sets it) skips the tests that would
start after it, so that a time-boxed run still ends normally, with its report and junit xml.
"""
import itertools
import os
import shutil
import time

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RCAR_FAST_AUTOTUNE", "quick")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"
FULL_TESTS = os.environ.get("RCAR_FAST_FULL_TESTS") == "1"

# Marks only: the skips are added in pytest_collection_modifyitems, so that `-m gpu` /
# `-m interpreter` select on the same marks that decide the skips.
requires_gpu = pytest.mark.gpu
requires_interpreter = pytest.mark.interpreter

_NO_GPU = "needs a CUDA GPU"
_INTERPRETED_ON_GPU = ("TRITON_INTERPRET=1 with a GPU: the Triton kernels are interpreted, the GPU "
                       "tests need them compiled (unset TRITON_INTERPRET)")
_NO_INTERPRETER = ("needs triton's CPU interpreter (CPU tensors through backend='triton'): this "
                   "session compiles the Triton kernels for the GPU instead (the `gpu` tests cover "
                   "them; CPU CI runs this test)")


def pytest_collection_modifyitems(config, items):
    gpu_skip = None if HAS_GPU and not TRITON_INTERPRETED else _NO_GPU if not HAS_GPU else _INTERPRETED_ON_GPU
    for item in items:
        if gpu_skip and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=gpu_skip))
        if not TRITON_INTERPRETED and item.get_closest_marker("interpreter"):
            item.add_marker(pytest.mark.skip(reason=_NO_INTERPRETER))


def assert_interpreter_dispatch(op: str) -> None:
    """Under triton's interpreter: `op` on backend='triton' takes CPU float32, refuses
    bfloat16 naming the interpreter, and auto never picks triton for CPU tensors (the
    interpreter is for tests)."""
    from rcar_fast import dispatch

    cpu = torch.device("cpu")
    assert dispatch.rejection(op, "triton", cpu, torch.float32) is None
    reason = dispatch.rejection(op, "triton", cpu, torch.bfloat16)
    assert reason is not None and "interpreter" in reason
    assert dispatch.choose(op, "auto", cpu, torch.float32).backend != "triton"


def pairwise_covering(axes) -> list:
    """A subset of itertools.product(*axes) in which every value of every axis, and every pair
    of values of two axes, occurs at least once (greedy, deterministic: the product's order).
    With two axes or fewer that vary, it is the whole product."""
    def covers(row):
        singles = {(i, v) for i, v in enumerate(row)}
        return singles | {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}

    rows = list(itertools.product(*axes))
    uncovered = set().union(*map(covers, rows)) if rows else set()
    chosen = []
    while uncovered:
        best = max(rows, key=lambda row: len(covers(row) & uncovered))
        chosen.append(best)
        uncovered -= covers(best)
    return chosen


def sweep(*axes) -> list:
    """The combinations a parametrised test runs over: every one under RCAR_FAST_FULL_TESTS=1,
    else a pairwise-covering subset (every value, and every pair of values of two axes)."""
    return list(itertools.product(*axes)) if FULL_TESTS else pairwise_covering(axes)


_DEADLINE = float(os.environ.get("RCAR_FAST_TEST_DEADLINE") or "inf")


def pytest_runtest_setup(item):
    if time.time() > _DEADLINE:
        pytest.skip("out of time: RCAR_FAST_TEST_DEADLINE (the GPU check's budget) has passed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# The native extension (rcar_fast._C): what the CPU and CUDA kernel tests share
# ---------------------------------------------------------------------------------------------

def _nvcc_available() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


# The extension carries the CUDA kernels wherever nvcc exists (unless RCAR_FAST_CUDA=0).
requires_cuda_build = pytest.mark.skipif(
    not _nvcc_available() or os.environ.get("RCAR_FAST_CUDA") == "0",
    reason="no nvcc on this machine (or RCAR_FAST_CUDA=0): the extension is CPU-only")


def native_or_skip(with_cuda: bool = False):
    """rcar_fast._C, or a skip naming why it is not importable (or, with_cuda, why it has no
    CUDA kernels)."""
    from rcar_fast import dispatch

    native = dispatch.native_module()
    if isinstance(native, str):
        pytest.skip(native)
    if with_cuda and not native.built_with_cuda():
        pytest.skip("the extension was built without the CUDA kernels")
    return native


@pytest.fixture(scope="session")
def cuda_compiled(tmp_path_factory):
    """Every csrc/cuda/*.cu compiled once per session with nvcc for sm_80 and sm_90a, ptxas's
    resource stats on (tests/test_cuda_compiles.py compile_sources: setup.py's own compile when
    current): {source basename: (exit code, log, object bytes)}. Shared by every test that reads a unit's compile (a cold nvcc compile of
    maxsim.cu costs minutes on 2 cores: once is enough)."""
    from tests.test_cuda_compiles import compile_sources

    return compile_sources(str(tmp_path_factory.mktemp("cuda_objects")))


@pytest.fixture
def baseline_simd():
    """Runs the test on the baseline (non-AVX2) copy of the CPU kernels' vector loops."""
    from rcar_fast import dispatch

    native = dispatch.native_module()
    assert native.set_cpu_simd_path("baseline") == "baseline"
    yield
    native.set_cpu_simd_path("auto")
