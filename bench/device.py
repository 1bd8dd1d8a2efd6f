"""Facts about the machine a benchmark ran on, and the device peaks that TFLOP/s are held to.

GPU: NVML through nvidia-ml-py (`import pynvml`) when installed: name, driver, CUDA driver
version, memory, SM / memory clocks (current and max), temperature, power; read at the start
and at the end of a run (clocks and temperature drift under load, which explains outliers).
Without nvidia-ml-py, what torch.cuda reports. CPU: model, cores, threads, load average.
Always: torch / triton / CUDA versions, Python, git commit, date.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) peak TFLOP/s by NVML name pattern, first match wins (more specific first).
# fp32 is the CUDA-core FMA peak; tf32 the tensor-core peak that fp32 matmuls reach when TF32
# is allowed (Triton's tl.dot uses TF32 for fp32 by default, so a kernel may exceed 100% of
# the fp32 peak). Sources: NVIDIA H100 / H200 / A100 datasheets.
GPU_PEAKS = (
    (r"H100.*PCIe", dict(fp64=51.2, fp32=51.2, tf32=378.0, fp16=756.0, bf16=756.0)),
    (r"H100.*NVL", dict(fp64=60.0, fp32=60.0, tf32=417.5, fp16=835.0, bf16=835.0)),
    (r"H100", dict(fp64=67.0, fp32=66.9, tf32=494.7, fp16=989.4, bf16=989.4)),       # SXM5
    (r"H200.*NVL", dict(fp64=60.0, fp32=60.0, tf32=417.5, fp16=835.0, bf16=835.0)),
    (r"H200", dict(fp64=67.0, fp32=66.9, tf32=494.7, fp16=989.4, bf16=989.4)),       # SXM
    (r"A100.*(PCIe|PCIE)", dict(fp64=19.5, fp32=19.5, tf32=156.0, fp16=312.0, bf16=312.0)),
    (r"A100", dict(fp64=19.5, fp32=19.5, tf32=156.0, fp16=312.0, bf16=312.0)),
)
DTYPE_PEAK_KEY = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
                  torch.bfloat16: "bf16"}


def gpu_peaks(name: str) -> Optional[dict]:
    """The peak table row of a GPU by its (NVML / torch) name, or None if unknown."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return peaks
    return None


def peak_tflops(name: str, dtype: torch.dtype) -> Optional[float]:
    peaks = gpu_peaks(name)
    return None if peaks is None else peaks.get(DTYPE_PEAK_KEY.get(dtype, ""))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """Short commit hash, '+dirty' when tracked files differ from it; '' outside a checkout."""
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return commit


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_facts() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    facts = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
             "torch_threads": torch.get_num_threads()}
    try:
        facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return facts


def _nvml_snapshot(index: int) -> dict:
    """NVML readings of GPU `index` (as torch numbers it); {'nvml': reason} if unavailable."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVML library missing or driver mismatch
        return {"nvml": f"nvmlInit failed: {err}"}
    try:
        handle = _nvml_handle(pynvml, index)
        facts = {"nvml": "ok"}
        readings = {
            "name": lambda: pynvml.nvmlDeviceGetName(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion,
            "cuda_driver": lambda: pynvml.nvmlSystemGetCudaDriverVersion(),
            "memory_total_mib": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
            "memory_used_mib": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20,
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
        }
        for key, read in readings.items():
            try:
                value = read()
                facts[key] = value.decode() if isinstance(value, bytes) else value
            except Exception as err:  # a reading unsupported on this GPU / driver
                facts[key] = f"n/a ({type(err).__name__})"
        return facts
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_handle(pynvml, index: int):
    # torch's index follows CUDA_VISIBLE_DEVICES; NVML's does not: match by PCI bus id.
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    domain = getattr(props, "pci_domain_id", 0)
    device = getattr(props, "pci_device_id", 0)
    if bus is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0")
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_facts(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    facts = {"gpu_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
             "sm_count": props.multi_processor_count,
             "compute_capability": f"{props.major}.{props.minor}"}
    facts.update(_nvml_snapshot(index))
    return facts


def software_facts() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "", "python": platform.python_version(),
            "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """Results file stem: the GPU's name, or the CPU model and usable thread count."""
    if device.type == "cuda":
        return slug(device_name(device))
    return slug(f"cpu {cpu_model()} {cpu_facts()['cpu_usable']}t")


def snapshot(device: torch.device) -> dict:
    """Readings that can change during a run (taken at its start and end)."""
    facts = cpu_facts()
    if device.type == "cuda":
        facts.update(gpu_facts(device.index if device.index is not None else torch.cuda.current_device()))
    return facts
