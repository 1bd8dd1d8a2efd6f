"""The native layout (csrc/bindings.h): every kernel unit binds its own Python entries, so the
names a unit defines are exactly what rcar_fast._C offers from it. Reads the sources as text
and imports the built module; needs no GPU and no nvcc."""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU_UNITS = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
CUDA_UNITS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# Defined by csrc/bindings.cpp when the CUDA units are not built in (and by common.cu when they are).
ALWAYS = {"built_with_cuda", "cuda_device_count"}


def bound_names(unit: pathlib.Path) -> set:
    """The functions and classes a unit's RCAR_FAST_BINDINGS block puts on the module."""
    text = unit.read_text()
    block = text[text.index("RCAR_FAST_BINDINGS("):]
    functions = re.findall(r'(?:m\.def|bind_launcher<[^>]*>)\(\s*(?:m,\s*)?"(\w+)"', block)
    classes = re.findall(r'(?:settings_class<[^(]*>|ProblemClass<\w+>\s*\w*)\(\s*m,\s*"(\w+)"', block)
    return set(functions) | set(classes)


@pytest.fixture(scope="module")
def native():
    try:
        return importlib.import_module("rcar_fast._C")
    except ImportError as err:
        pytest.skip(f"rcar_fast._C is not built here ({err})")


@pytest.mark.parametrize("unit", CPU_UNITS + CUDA_UNITS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_kernel_unit_registers_once(unit):
    assert len(re.findall(r"^RCAR_FAST_BINDINGS\(\w+, m\)", unit.read_text(), re.M)) == 1
    assert bound_names(unit), f"{unit.name}: no binding found in its RCAR_FAST_BINDINGS block"


def test_the_module_holds_exactly_what_the_units_bind(native):
    public = {name for name in dir(native) if not name.startswith("__")}
    cpu = set().union(*map(bound_names, CPU_UNITS))
    cuda = set().union(*map(bound_names, CUDA_UNITS))
    assert not cpu & cuda, f"bound by a CPU and a CUDA unit: {sorted(cpu & cuda)}"
    expected = cpu | ALWAYS | (cuda if native.built_with_cuda() else set())
    assert public == expected, (f"in the module only: {sorted(public - expected)}; "
                                f"bound but missing: {sorted(expected - public)}")


def test_no_shared_declaration_files_remain():
    # A new kernel edits no shared native file: no kernels.h / bindings_*.cpp to keep in step.
    leftovers = [p.relative_to(ROOT) for p in [*(ROOT / "csrc").rglob("kernels.h"), *(ROOT / "csrc").glob("bindings_*")]]
    assert not leftovers, leftovers
