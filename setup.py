"""Build of rcar_fast: one native extension `rcar_fast._C` from csrc/.

* The C++ CPU kernels (csrc/cpu/*.cpp) and the module (csrc/bindings.cpp) always build,
  through torch.utils.cpp_extension (pybind11 + ninja). Every kernel unit binds its own
  Python entries (csrc/bindings.h), so a new kernel file is picked up by the globs below
  without editing this file or any shared native file.
* The CUDA kernels (csrc/cuda/*.cu) include no torch header (the CPU torch wheel ships
  none): nvcc compiles them to plain objects that are linked into the same extension,
  together with the static CUDA runtime, so the module imports on a machine with no GPU
  and no libcudart on the loader path. Each .cu ends with its host-only pybind11 block.
  RCAR_FAST_CUDA=0 skips them, RCAR_FAST_CUDA=1 makes a missing nvcc an error; unset,
  they build whenever nvcc is found.
* Triton kernels live in kernels/ and ship as the subpackage rcar_fast.kernels.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sysconfig

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_80 (A100) portable path and sm_90a (H100/H200, wgmma/TMA), plus PTX for newer parts.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]


def cuda_binding_includes():
    """nvcc's include flags for the .cu files' host-only binding blocks (csrc/cuda/bind.h): the
    pybind11 that torch ships (the one every C++ unit of the module compiles against; no torch
    header is included) and Python's headers."""
    return ["-isystem", include_paths()[0], "-isystem", sysconfig.get_paths()["include"]]


def find_cuda_home():
    """The CUDA toolkit root, or None. nvcc on PATH may be a wrapper script, so prefer
    CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then the directory above nvcc."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def want_cuda():
    flag = os.environ.get("RCAR_FAST_CUDA", "").strip()
    home = find_cuda_home()
    if flag == "0":
        return None
    if flag == "1" and home is None:
        raise RuntimeError("RCAR_FAST_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    return home


class BuildWithNvccObjects(BuildExtension):
    """Compiles csrc/cuda/*.cu with nvcc into objects before linking the extension."""

    def build_extensions(self):
        cuda_home = want_cuda()
        if cuda_home is not None:
            lib_dir = static_cudart_dir(cuda_home)  # before minutes of nvcc, not after
            objects = self.compile_cuda_objects(cuda_home)
            # Link-time only: the C++ units compile the same with or without CUDA (the .cu
            # objects register their own bindings), so ninja reuses them across both builds.
            for ext in self.extensions:
                ext.extra_objects += objects
                ext.library_dirs.append(lib_dir)
                ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        super().build_extensions()

    def compile_cuda_objects(self, cuda_home):
        """One nvcc process per out-of-date .cu file, up to one per CPU at a time (a serial
        build takes minutes; each file is independent)."""
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        out_dir = os.path.join(self.build_temp, "cuda_objects")
        os.makedirs(out_dir, exist_ok=True)
        headers = [h for folder in ("csrc", os.path.join("csrc", "cuda")) for ext in ("*.h", "*.cuh")
                   for h in glob.glob(os.path.join(ROOT, folder, ext))]
        objects, commands = [], []
        for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            if not os.path.exists(obj) or os.path.getmtime(obj) < max(map(os.path.getmtime, [src] + headers)):
                commands.append([nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                                 "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "csrc"), *cuda_binding_includes(),
                                 *CUDA_ARCH_FLAGS])
            objects.append(obj)
        workers = max(1, min(len(commands), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for cmd in commands:
                print(" ".join(cmd), flush=True)
            # list(): wait for all, and re-raise the first CalledProcessError
            list(pool.map(compile_with_ptxas_log, commands))
        return objects


# ptxas's resource stats of the last build of each .cu (registers, spills), kept outside the
# (possibly temporary) build folder: tests/test_cuda_compiles.py reads them instead of compiling
# every unit a second time (minutes cold on 2 cores) when they are newer than the sources.
PTXAS_LOG_DIR = os.path.join(ROOT, "build", "cuda_ptxas")
OBJECT_LINE = "[setup.py] object bytes:"


def compile_with_ptxas_log(cmd):
    """Runs one nvcc command with -Xptxas -v, its output in PTXAS_LOG_DIR/<source>.log (and
    on the console if it fails); a failure raises CalledProcessError."""
    os.makedirs(PTXAS_LOG_DIR, exist_ok=True)
    log_path = os.path.join(PTXAS_LOG_DIR, os.path.basename(cmd[2]) + ".log")
    if os.path.exists(log_path):
        os.remove(log_path)  # a failed build leaves no log that looks current
    done = subprocess.run([*cmd, "-Xptxas", "-v"], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, flush=True)
        raise subprocess.CalledProcessError(done.returncode, cmd)
    obj = cmd[cmd.index("-o") + 1]
    with open(log_path + ".tmp", "w") as log:
        log.write(done.stdout + done.stderr + f"\n{OBJECT_LINE} {os.path.getsize(obj)}\n")
    os.replace(log_path + ".tmp", log_path)


def static_cudart_dir(cuda_home):
    """The folder holding libcudart_static.a (linked so that the module imports without a
    libcudart on the loader path), or a RuntimeError naming the folders searched."""
    candidates = [os.path.join(cuda_home, sub) for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "libcudart_static.a")):
            return folder
    raise RuntimeError(
        f"libcudart_static.a (the static CUDA runtime the CUDA kernels link against) is not in any of "
        f"{', '.join(candidates)}; install the CUDA toolkit's static runtime, point CUDA_HOME at a "
        f"toolkit that has it, or build without the CUDA kernels: RCAR_FAST_CUDA=0")


def cpu_openmp_flags():
    # The CPU kernels parallelise over tiles with OpenMP; torch's CPU wheel links libgomp.
    return ["-fopenmp"]


ext = CppExtension(
    name="rcar_fast._C",
    sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args=["-O3", "-std=c++20", *cpu_openmp_flags()],
    extra_link_args=cpu_openmp_flags(),
)

setup(
    packages=["rcar_fast", "rcar_fast.ops", "rcar_fast.evaluation", "rcar_fast.kernels"],
    package_dir={"rcar_fast": "rcar_fast", "rcar_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithNvccObjects.with_options(use_ninja=True)},
)
