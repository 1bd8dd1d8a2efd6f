"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 (A100, the portable path) and
sm_90a (H100/H200), with the flags setup.py uses. Runs on machines without a GPU (nvcc only);
skips where no nvcc is installed. The compile is the extension build's own when setup.py's
ptxas logs (build/cuda_ptxas) are newer than the sources (CI: scripts/setup.sh has just built
it); else the files compile here, in parallel, one nvcc call per file covering both
architectures (minutes cold on 2 cores).

The compiles also print ptxas's resource stats (-Xptxas -v): the shared tile (tile.cuh,
compiled alone in a probe kernel per dtype) must not spill registers on either architecture
(the S-only heads' kernels: tests/test_maxsim_cuda.py, with these helpers)."""
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import textwrap

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


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME): cannot compile csrc/cuda/*.cu")


def binding_includes():
    """As setup.py's cuda_binding_includes: torch's pybind11 and Python's headers, for each
    .cu's host-only binding block (csrc/cuda/bind.h)."""
    from torch.utils.cpp_extension import include_paths

    return ["-isystem", include_paths()[0], "-isystem", sysconfig.get_paths()["include"]]


def compile_one(source, out_dir):
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [NVCC, "-c", source, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
           "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "csrc"), *binding_includes(), *ARCH_FLAGS,
           "-Xptxas", "-v"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_FILE_TIMEOUT_S)
    return source, done.returncode, done.stdout + done.stderr, obj


def kernel_stats(log):
    """(kernel, arch, registers, spill store bytes, spill load bytes) per entry function in a
    -Xptxas -v log."""
    stats, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
        if entry:
            current = [entry.group(1), entry.group(2), None, None, None]
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current:
            current[3], current[4] = int(spills.group(1)), int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current:
            current[2] = int(registers.group(1))
            stats.append(tuple(current))
            current = None
    return stats


# setup.py keeps ptxas's log of its own nvcc compile of each .cu here (setup.py PTXAS_LOG_DIR),
# ending with the size of the object it wrote.
SETUP_PTXAS_LOGS = os.path.join(ROOT, "build", "cuda_ptxas")
SETUP_OBJECT_LINE = "[setup.py] object bytes:"


def setup_build_logs():
    """setup.py's compile of every .cu (the extension's own, same flags plus PTX), when each
    log is newer than every CUDA source and header: {basename: (0, log, object bytes)}; else
    None (RCAR_FAST_CUDA=0, a build older than the sources, a failed build)."""
    headers = [h for folder in ("csrc", os.path.join("csrc", "cuda")) for ext in ("*.h", "*.cuh")
               for h in glob.glob(os.path.join(ROOT, folder, ext))]
    newest_input = max(map(os.path.getmtime, SOURCES + headers))
    results = {}
    for source in SOURCES:
        path = os.path.join(SETUP_PTXAS_LOGS, os.path.basename(source) + ".log")
        if not os.path.exists(path) or os.path.getmtime(path) < newest_input:
            return None
        log = open(path).read()
        sizes = re.findall(rf"^{re.escape(SETUP_OBJECT_LINE)} (\d+)$", log, re.M)
        if not sizes:
            return None
        results[os.path.basename(source)] = (0, log, int(sizes[-1]))
    return results


def compile_sources(out_dir):
    """Every csrc/cuda/*.cu compiled with nvcc: {source basename: (exit code, log, object
    bytes)}. Reads setup.py's logs of the extension build when they are current (the same
    compile: no second one), else compiles into out_dir, in parallel. Tests take it from
    conftest's session fixture `cuda_compiled` (once per session)."""
    assert SOURCES, "no csrc/cuda/*.cu found"
    from_setup = setup_build_logs()
    if from_setup is not None:
        return from_setup
    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    # The biggest files go first so that the slowest compile starts at once.
    order = sorted(SOURCES, key=os.path.getsize, reverse=True)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda src: compile_one(src, out_dir), order))
    return {os.path.basename(src): (rc, log, os.path.getsize(obj) if os.path.exists(obj) else 0)
            for src, rc, log, obj in results}


def assert_no_spills(stats, what):
    assert stats, f"{what}: ptxas printed no kernel stats"
    archs = {arch for _, arch, *_ in stats}
    assert archs == {"sm_80", "sm_90a"}, f"{what}: stats for {sorted(archs)}"
    spilling = [f"{name} ({arch}): {regs} registers, {st} bytes spill stores, {ld} bytes spill loads"
                for name, arch, regs, st, ld in stats if st or ld]
    assert not spilling, f"{what} spills registers:\n" + "\n".join(spilling)


@pytest.mark.slow
@needs_nvcc
def test_every_cuda_source_compiles_for_sm80_and_sm90a(cuda_compiled):
    failures = [f"csrc/cuda/{name} (exit {rc}):\n{log[-3000:]}" for name, (rc, log, _) in cuda_compiled.items()
                if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for name, (_, _, object_bytes) in cuda_compiled.items():
        assert object_bytes > 0, f"csrc/cuda/{name}: empty object file"


# The shared tile alone: a probe kernel per input dtype that stages, multiplies and stores one
# block's tile (both layouts), so tile.cuh is checked as a self-contained header.
TILE_PROBE = textwrap.dedent("""
    #include "cuda/tile.cuh"
    struct ProbeProblem {
      const void* img; const void* cap;
      int64_t d, n_img, R, img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
      const int64_t* lens; const int64_t* word_off; const int32_t* group_first; const int64_t* img_lens;
    };
    template <typename T>
    __global__ void __launch_bounds__(rcar_cuda::tile::kThreads, 1)
    tile_probe_kernel(ProbeProblem p, int col_frags, bool region_major, bool vec, float* out) {
      using namespace rcar_cuda::tile;
      extern __shared__ __align__(128) unsigned char smem[];
      const Tile t = make_tile(col_frags);
      const Regions r = make_regions(t, sizeof(T) == 2, region_major);
      const BlockWork w = block_work(p, t);
      int64_t* row_off = reinterpret_cast<int64_t*>(smem + r.row_off);
      int64_t* col_off = reinterpret_cast<int64_t*>(smem + r.col_off);
      fill_offset_tables(p, t, w, p.img_lens, row_off, col_off);
      score_tile<T>(p, t, score_ld(t, region_major), region_major, w, row_off, col_off, smem + r.main, vec);
      out[blockIdx.x * kThreads + threadIdx.x] = reinterpret_cast<const float*>(smem + r.main)[threadIdx.x];
    }
    template __global__ void tile_probe_kernel<float>(ProbeProblem, int, bool, bool, float*);
    template __global__ void tile_probe_kernel<__half>(ProbeProblem, int, bool, bool, float*);
    template __global__ void tile_probe_kernel<__nv_bfloat16>(ProbeProblem, int, bool, bool, float*);
""")


@pytest.mark.slow
@needs_nvcc
def test_the_shared_tile_compiles_alone_without_spills(tmp_path):
    probe = tmp_path / "tile_probe.cu"
    probe.write_text(TILE_PROBE)
    _, rc, log, _ = compile_one(str(probe), str(tmp_path))
    assert rc == 0, log[-3000:]
    stats = kernel_stats(log)
    assert len(stats) == 6, f"expected 3 dtypes x 2 architectures, got {stats}"
    assert_no_spills(stats, "csrc/cuda/tile.cuh (probe kernel)")


def test_every_cuda_unit_binds_itself_in_host_only_code():
    # The device passes of nvcc must not see pybind11 (so that the device code is the same as
    # without the bindings): each .cu includes csrc/cuda/bind.h only under #ifndef __CUDA_ARCH__,
    # and registers once, under a name of its own (csrc/bindings.h).
    names = []
    for source in SOURCES:
        text = open(source).read()
        guard = text.find("#ifndef __CUDA_ARCH__")
        include = text.find('#include "cuda/bind.h"')
        assert 0 <= guard < include, f"{source}: include cuda/bind.h under #ifndef __CUDA_ARCH__"
        assert text.find("#endif", include) > include, source
        names += re.findall(r"^RCAR_FAST_BINDINGS\((\w+), m\)", text, re.M)
    assert len(names) == len(SOURCES) == len(set(names)), names
