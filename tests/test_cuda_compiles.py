"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 (A100, the portable path) and
sm_90a (H100/H200), with the flags setup.py uses. Runs on machines without a GPU (nvcc only);
skips where no nvcc is installed. Files compile in parallel, one nvcc call per file covering
both architectures, so the whole check stays around a minute or two even on 2 cores."""
import concurrent.futures
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
PER_FILE_TIMEOUT_S = 300


def find_nvcc():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


NVCC = find_nvcc()


def compile_one(source, out_dir):
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [NVCC, "-c", source, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
           "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "csrc"), *ARCH_FLAGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_FILE_TIMEOUT_S)
    return source, done.returncode, done.stdout + done.stderr, obj


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME): cannot compile csrc/cuda/*.cu")
def test_every_cuda_source_compiles_for_sm80_and_sm90a(tmp_path):
    assert SOURCES, "no csrc/cuda/*.cu found"
    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    # The biggest files go first so that the slowest compile starts at once.
    order = sorted(SOURCES, key=os.path.getsize, reverse=True)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda src: compile_one(src, str(tmp_path)), order))
    failures = [f"{os.path.relpath(src, ROOT)} (exit {rc}):\n{log[-3000:]}"
                for src, rc, log, _ in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for src, _, _, obj in results:
        assert os.path.getsize(obj) > 0, f"{os.path.relpath(src, ROOT)}: empty object file"


@pytest.mark.slow
def test_the_cuda_binding_compiles_with_cuda_enabled():
    # csrc/bindings_cuda.cpp is host C++ (torch and pybind11 headers, no CUDA headers), but its
    # CUDA half only builds where nvcc is found: check it here with the host compiler alone.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    includes = [f"-I{path}" for path in (os.path.join(ROOT, "csrc"), *include_paths(), sysconfig.get_paths()["include"])]
    cmd = [compiler, "-fsyntax-only", "-std=c++20", "-DRCAR_FAST_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C", *includes, os.path.join(ROOT, "csrc", "bindings_cuda.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_FILE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
