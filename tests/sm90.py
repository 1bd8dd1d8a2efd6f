"""Offline compilation for the H100 (sm_90), no GPU needed.

The GPU configurations of the Triton kernels must compile for sm_90 and fit its shared memory;
the CPU interpreter cannot tell (tl.dot shape/dtype rules, bf16/fp16 lowering, shared memory
of the software pipeline are GPU-only). Tests run a script in a fresh interpreter without
TRITON_INTERPRET (triton reads it when it decorates and when it compiles, so a test process,
interpreter on, cannot compile for a GPU target), compiling in a loop inside it.

Two triton versions: the one installed here (CI's) and the GPU image's (TRITON_GPU_IMAGE,
installed by `triton_folder` from the package registry into a cache folder and put first on
the script's path), as the two compile differently (registers, spills).

Test side: `compiler_available`, `requires_sm90_compiler`, `triton_folder(version)`,
`run_offline(script, payload, triton_path=...)`.
Script side: `record(module, names)` puts LaunchRecorders in place of a module's kernels, so
that its real launcher, run on CPU (or meta) tensors, records each launch (and, for autotuned
kernels, the configs its prune keeps); `compile_launch` / `compile_many` compile launches for
sm_90 exactly as triton's launcher would (its own binder specialises the arguments: dtypes,
16-byte alignment, ints equal to 1 or divisible by 16) and read each cubin's resource usage
(registers and stack bytes per thread: register spills live on the stack), and `emit` hands
results back.
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

H100_SHARED_BYTES = 232448  # max dynamic shared memory per block on sm_90 (227 KB)
SM90 = ("cuda", 90, 32)


def compiler_available() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


requires_sm90_compiler = pytest.mark.skipif(not compiler_available(),
                                            reason="triton's NVIDIA backend is not installed")


# The triton of the GPU image (torch 2.11 + CUDA 13); CI and development machines have a newer one.
TRITON_GPU_IMAGE = "3.6.0"


def _cache_root() -> str:
    return os.environ.get("RCAR_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "rcar_fast")


def triton_folder(version: str) -> str:
    """A folder holding triton==`version` (no dependencies: only its compiler is used), installed
    once from the package registry into the cache (RCAR_FAST_CACHE, default ~/.cache/rcar_fast)
    and reused. Skips the calling test, saying why, when the registry cannot be reached."""
    folder = os.path.join(_cache_root(), f"triton-{version}")
    if os.path.isfile(os.path.join(folder, "triton", "__init__.py")):
        return folder
    os.makedirs(_cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"triton-{version}.", dir=_cache_root())
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--disable-pip-version-check", "--timeout", "30", "--retries", "1",
                              "--target", staging, f"triton=={version}"],
                             capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            pytest.skip(f"cannot install triton=={version} from the package registry (needed to "
                        f"compile as the GPU image does): {run.stderr.strip()[-500:]}")
        try:
            os.rename(staging, folder)  # atomic: a half-installed folder is never used
        except OSError:  # another process installed it first
            if not os.path.isfile(os.path.join(folder, "triton", "__init__.py")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def run_offline(script: str, payload, timeout: float = 1500, triton_path: str = None):
    """Run `script` (python source; argv[1] is json(payload)) in a fresh interpreter without
    TRITON_INTERPRET, the repository on the path (and, if given, `triton_path` first: the
    triton it imports). The script prints one line 'RESULTS<json>'; returns the decoded json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Full autotuning (RCAR_FAST_AUTOTUNE unset): the quick config lists are subsets of it.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RCAR_FAST_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in (triton_path, root, env.get("PYTHONPATH")) if p])
    run = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout)
    marker = [line for line in run.stdout.splitlines() if line.startswith("RESULTS")]
    assert marker, f"offline compile script failed:\n{run.stderr[-3000:]}"
    return json.loads(marker[-1][len("RESULTS"):])


def triton_version_of(triton_path: str = None) -> str:
    """The version of the triton that run_offline(..., triton_path) imports."""
    return run_offline("import triton\nfrom tests import sm90\nsm90.emit(triton.__version__)",
                       None, timeout=120, triton_path=triton_path)


def emit(results) -> None:
    """Script side: hand the results back to run_offline."""
    print("RESULTS" + json.dumps(results), flush=True)


# ---------------------------------------------------------------------------------------------
# Script side (imported in the subprocess only: needs TRITON_INTERPRET unset)
# ---------------------------------------------------------------------------------------------

def _error(err) -> dict:
    return dict(shared=None, regs=None, stack=None, error=f"{type(err).__name__}: {err}"[-3000:])


def _cuobjdump() -> str:
    """triton's bundled cuobjdump (both versions ship one), else the CUDA toolkit's."""
    import triton.backends.nvidia

    bundled = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    found = bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("no cuobjdump (neither triton's bundled one nor on PATH)")
    return found


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread of the one kernel in `cubin`, as the driver would
    report them (cuobjdump --dump-resource-usage; the stack holds ptxas's register spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return dict(regs=int(found.group(1)), stack=int(found.group(2)))


@functools.lru_cache(maxsize=None)
def _target():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget(*SM90)
    return target, make_backend(target)


def _prepare(kernel, kwargs: dict, config=None):
    """What triton's launcher would hand to triton.compile for this launch: (signature,
    constexprs, attrs, options), from its own binder (argument specialisation)."""
    from triton.runtime.jit import create_function_from_signature

    _, backend = _target()
    full = dict(kwargs)
    if config is not None:
        full.update(config.all_kwargs())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**full)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _compile(kernel, prepared) -> dict:
    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        signature, constexprs, attrs, options = prepared
        target, _ = _target()
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options)
        result = dict(shared=int(compiled.metadata.shared), error=None,
                      **resource_usage(compiled.asm["cubin"]))
    except Exception as err:  # reported by the test
        result = _error(err)
    return dict(result, seconds=round(time.perf_counter() - start, 2))


def compile_launch(kernel, kwargs: dict, config=None) -> dict:
    """Compile `kernel` (a @triton.jit function) for sm_90 as launched with the keyword
    arguments `kwargs` (tensors may be CPU or meta tensors: only their dtype and alignment
    matter) and, if given, the autotune `config` (its kwargs, num_warps, num_stages, ...).
    Returns dict(shared=bytes, regs=per thread, stack=bytes per thread, error=None,
    seconds=...) or dict(shared=None, regs=None, stack=None, error=text, ...)."""
    return compile_many([(kernel, kwargs, config)], workers=1)[0]


_JOBS = []  # the unique compiles of compile_many, inherited by its forked workers


def _compile_job(index):
    kernel, prepared = _JOBS[index]
    return _compile(kernel, prepared)


def compile_many(launches, workers=None):
    """compile_launch for each (kernel, kwargs, config) of `launches`, compiling each distinct
    specialisation once, in `workers` forked processes (default: the CPUs this process may
    use). Returns the results in order."""
    import concurrent.futures
    import multiprocessing

    keys, results, unique = [], [None] * len(launches), {}
    for i, (kernel, kwargs, config) in enumerate(launches):
        try:
            prepared = _prepare(kernel, kwargs, config)
        except Exception as err:  # reported by the test
            results[i] = _error(err)
            keys.append(None)
            continue
        key = repr((kernel.__name__, *(sorted(part.items()) for part in prepared)))
        if key not in unique:
            unique[key] = len(_JOBS)
            _JOBS.append((kernel, prepared))
        keys.append(unique[key])
    todo = sorted(set(k for k in keys if k is not None))
    workers = min(workers or len(os.sched_getaffinity(0)), len(todo))
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork")) as pool:
            done = dict(zip(todo, pool.map(_compile_job, todo)))
    else:
        done = {k: _compile_job(k) for k in todo}
    for i, k in enumerate(keys):
        if k is not None:
            results[i] = dict(done[k])
    return results


def add_recorded(rec, launches: list, owners: list, pad_names, **owner) -> None:
    """Script side: each launch `rec` recorded, once per config its autotuner would try, onto
    `launches` (for compile_many), and whose it is onto `owners`: `owner` plus the launch's
    padding constexprs named in `pad_names` and the config."""
    assert rec.launches, f"{owner['kernel']} was not launched"
    for nargs, kwargs in rec.launches:
        for config in rec.configs(nargs, kwargs):
            launches.append((rec.jit_fn, {**nargs, **kwargs}, config))
            owners.append(dict(owner, **{pad: kwargs[pad] for pad in pad_names},
                               config=str(config)))


def emit_by_case(launches: list, owners: list, n_cases: int) -> None:
    """Script side: compile `launches` (compile_many) and emit, per case, its owners' builds."""
    results = [[] for _ in range(n_cases)]
    for owner, build in zip(owners, compile_many(launches)):
        results[owner["case"]].append(dict(owner, **build))
    emit(results)


class LaunchRecorder:
    """Stands in for a kernel (a @triton.jit function or a triton.autotune wrapper) in its
    module, so that running the real launcher on CPU tensors records its launches instead of
    running them. Each launch is (positional arguments by name, keyword arguments)."""

    def __init__(self, real):
        self.real = real
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((dict(zip(self.real.arg_names, args)), kwargs))
        return launch

    @property
    def jit_fn(self):
        """The @triton.jit function under any autotune/heuristics wrappers."""
        from triton.runtime.jit import JITFunction

        fn = self.real
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    def configs(self, nargs: dict, kwargs: dict):
        """The autotune configs the real wrapper would benchmark for this launch (after its
        early_config_prune); [None] for a plain kernel."""
        tuner = self.real
        if not hasattr(tuner, "configs"):
            return [None]
        if tuner.early_config_prune is None:
            return list(tuner.configs)
        return list(tuner.early_config_prune(tuner.configs, nargs, **kwargs))


def record(module, *names):
    """Replace module.<name> by LaunchRecorders; returns them in the order of `names`."""
    recorders = []
    for name in names:
        rec = LaunchRecorder(getattr(module, name))
        setattr(module, name, rec)
        recorders.append(rec)
    return recorders
