"""One module per op: kernels are called from here, with autograd and the public wrapper
close by. Importing this package registers every implementation with rcar_fast.dispatch.
Per-backend modules (e.g. scan_triton, scan_cpu, scan_cuda) register themselves when importable."""
import importlib

from rcar_fast.ops import gram, scan  # noqa: F401  (registration side effects)

# Backend modules written per op; each registers its implementation on import.
_BACKEND_MODULES = ("scan_triton", "scan_cpu", "scan_cuda", "rcar", "rcar_triton", "rcar_cpu", "rcar_cuda")
for _name in _BACKEND_MODULES:
    try:
        importlib.import_module(f"rcar_fast.ops.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"rcar_fast.ops.{_name}":
            raise
