"""The contract's constants live in rcar_fast/contract.py only: csrc/contract.h is its generated
copy, and no other module of the tree re-declares an enumeration, a code table, eps or the leaky
slope."""
import ast
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from rcar_fast import contract

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY_DIRS = ("rcar_fast", "kernels", "bench", "tests", "examples", "scripts")
ENUMERATIONS = {"DIRECTIONS": contract.DIRECTIONS, "RAW_NORMS": contract.RAW_NORMS,
                "AGGREGATIONS": contract.AGGREGATIONS, "REGULATORS": contract.REGULATORS,
                "HEAD_DIRECTIONS": contract.HEAD_DIRECTIONS, "POOLS": contract.POOLS}


def test_the_committed_header_is_the_generated_one():
    generated = subprocess.run([sys.executable, "-m", "rcar_fast.contract", "--header"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "csrc" / "contract.h").read_text()
    assert committed == generated, (
        "csrc/contract.h is out of date: run `python -m rcar_fast.contract --header > csrc/contract.h`")


def test_the_header_states_every_code_of_the_contract():
    text = contract.header()
    for enum, names, cpp_names in contract._CPP_ENUMS:
        assert len(names) == len(cpp_names), enum
        for code, cpp in enumerate(cpp_names):
            assert f"{cpp} = {code}" in text
        assert f"k{enum}Count = {len(names)};" in text


def test_codes_are_the_indices_of_the_names():
    for names, codes in [(contract.DIRECTIONS, contract.DIRECTION_CODES),
                         (contract.RAW_NORMS, contract.RAW_NORM_CODES),
                         (contract.AGGREGATIONS, contract.AGG_CODES),
                         (contract.REGULATORS, contract.REGULATOR_CODES),
                         (contract.CUDA_DTYPES, contract.CUDA_DTYPE_CODES),
                         (contract.HEAD_DIRECTIONS, contract.HEAD_DIRECTION_CODES),
                         (contract.POOLS, contract.POOL_CODES)]:
        assert [codes[name] for name in names] == list(range(len(names)))
    for name in contract.CUDA_DTYPES + tuple(contract.SMOOTH_LIMITS):
        assert isinstance(getattr(torch, name), torch.dtype), name


def test_the_contract_imports_nothing_from_the_package_or_torch():
    tree = ast.parse((ROOT / "rcar_fast" / "contract.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"rcar_fast", "torch", "triton", "numpy"}, imported


def _python_files():
    for folder in PY_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _string_sequences(tree):
    """(line, strings) of every literal tuple / list / set made only of string constants."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, tuple(e.value for e in node.elts)


def _named_values(tree):
    """(line, value node) of every assignment to a name (module, class or function level)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) for t in node.targets):
            yield node.lineno, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            yield node.lineno, node.value


def _redeclarations(path: pathlib.Path, root: pathlib.Path = ROOT):
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root)
    found = []
    for line, strings in _string_sequences(tree):
        for name, names in ENUMERATIONS.items():
            # A full list of norms, aggregations or regulators is a copy of the contract's; the
            # two directions are common in loops, so for them only a named copy counts (below).
            if len(names) > 2 and set(strings) == set(names):
                found.append(f"{where}:{line}: a copy of contract.{name}")
    for line, value in _named_values(tree):
        if isinstance(value, (ast.Tuple, ast.List)) and all(
                isinstance(e, ast.Constant) for e in value.elts) and value.elts:
            if {e.value for e in value.elts} == set(contract.DIRECTIONS):
                found.append(f"{where}:{line}: a copy of contract.DIRECTIONS")
        if isinstance(value, ast.Dict) and value.keys and all(
                isinstance(v, ast.Constant) and isinstance(v.value, int) for v in value.values):
            keys = {k.value if isinstance(k, ast.Constant) else ast.unparse(k) for k in value.keys}
            for name, names in {**ENUMERATIONS, "CUDA_DTYPES": contract.CUDA_DTYPES}.items():
                torch_names = {f"torch.{n}" for n in names}
                if keys in (set(names), torch_names):
                    found.append(f"{where}:{line}: a code table of contract.{name}")
        if isinstance(value, ast.Constant) and value.value in (contract.EPS, contract.UNIT_NORM_EPS):
            found.append(f"{where}:{line}: eps {value.value!r} (use contract.EPS / UNIT_NORM_EPS)")
    return found


def test_no_python_module_redeclares_an_enumeration_or_eps():
    found = [hit for path in _python_files() if path.name != "contract.py" and path != pathlib.Path(__file__)
             for hit in _redeclarations(path)]
    assert not found, "read these from rcar_fast.contract instead:\n" + "\n".join(found)


def test_the_redeclaration_check_finds_a_copy(tmp_path):
    # The check above could pass by finding nothing at all: show it finds each kind of copy.
    probe = tmp_path / "probe.py"
    probe.write_text('NORMS = ("clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "no_norm",'
                     ' "softmax")\nDIRS = ("t2i", "i2t")\nCODES = {"mean": 0, "lse": 1, "max": 2, "sum": 3}\n'
                     'D = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}\nEPS = 1e-8\n'
                     'for d in ("t2i", "i2t"):\n    pass\n')
    hits = _redeclarations(probe, root=tmp_path)
    assert len(hits) == 5, hits


def test_the_redeclaration_check_finds_a_copy_of_the_head_enumerations(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('DIRS = ("t2i", "i2t", "both")\nfor p in ["mean", "sum", "max", "lse", "softmax"]:\n'
                     '    pass\nCODES = {"t2i": 0, "i2t": 1, "both": 2}\nUNIT_EPS = 1e-12\n'
                     'AGGS_ARE_NOT_POOLS = ("mean", "lse", "max")\n')
    hits = _redeclarations(probe, root=tmp_path)
    assert sorted(h.split(": ", 1)[1] for h in hits) == [
        "a code table of contract.HEAD_DIRECTIONS", "a copy of contract.HEAD_DIRECTIONS",
        "a copy of contract.POOLS", "eps 1e-12 (use contract.EPS / UNIT_NORM_EPS)"], hits


def test_the_head_header_enums_follow_the_contract():
    text = contract.header()
    assert "enum HeadDirection : int { kHeadT2I = 0, kHeadI2T = 1, kHeadBoth = 2 };" in text
    assert ("enum Pool : int { kPoolMean = 0, kPoolSum = 1, kPoolMax = 2, kPoolLse = 3, "
            "kPoolSoftmax = 4 };") in text
    assert "constexpr double kUnitNormEps = 1e-12;" in text


def test_head_presets_follow_heads_md():
    presets = contract.HEAD_PRESETS
    assert set(presets) == {"chan", "laps", "aladin", "teran", "colbert", "dvsa"}
    assert presets["chan"] == dict(direction="t2i", pool="lse", tau=0.1, leaky=False, normalize="none")
    assert presets["laps"] == dict(direction="both", pool="mean", leaky=True, normalize="unit",
                                   both_scale=1.0)
    mrsw_unit = dict(direction="t2i", pool="sum", leaky=False, normalize="unit")
    assert presets["aladin"] == presets["teran"] == mrsw_unit
    assert presets["colbert"] == presets["dvsa"] == {**mrsw_unit, "normalize": "none"}
    for name, kwargs in presets.items():   # every value is one the contract names
        assert kwargs["direction"] in contract.HEAD_DIRECTIONS, name
        assert kwargs["pool"] in contract.POOLS, name
        assert kwargs["normalize"] in contract.HEAD_NORMALIZATIONS, name
    assert contract.CHAN_TAU == 0.1 and contract.UNIT_NORM_EPS == 1e-12


# Literals that belong in csrc/contract.h: an enum of the contract's names, eps, the leaky slope.
_CPP_COPIES = re.compile(r"enum\s+(RawNorm|Aggregation|Regulator|DType|Direction|HeadDirection|Pool)\b"
                         r"|\b1e-8f?\b|\b1e-12f?\b|\b0\.1f?\b")


@pytest.mark.parametrize("path", sorted(p for ext in ("*.h", "*.cuh", "*.cpp", "*.cu")
                                        for p in (ROOT / "csrc").rglob(ext) if p.name != "contract.h"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_native_source_redeclares_the_contract(path):
    code = re.sub(r"//[^\n]*", "", path.read_text())  # comments may name the values
    hits = [m.group(0) for m in _CPP_COPIES.finditer(code)]
    assert not hits, f"{path.relative_to(ROOT)} restates {hits}: include contract.h and use rcar_contract::"


def test_native_sources_include_the_generated_header():
    assert '#include "contract.h"' in (ROOT / "csrc" / "cpu" / "tile_common.h").read_text()
    for kernel in ("gram.cu", "maxsim.cu", "rcar.cu", "scan.cu"):
        assert '#include "contract.h"' in (ROOT / "csrc" / "cuda" / kernel).read_text(), kernel


def _head(regulator, steps):
    from rcar_fast.reference import RCARHead

    return RCARHead(embed_dim=6, sim_dim=4, regulator=regulator, steps=steps)


@pytest.mark.parametrize("regulator,steps", [("coop_rcar", 2), ("only_rar", 2), ("only_rcr", 1), ("only_rcr", 0)])
def test_the_weight_walk_visits_every_linear_of_the_head_once(regulator, steps):
    head = _head(regulator, steps)
    walk = contract.rcar_linears(head)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(map(id, (lin for _, lin, _ in walk))) == sorted(map(id, linears))
    for short, lin, to_one in walk:
        assert (lin.out_features == 1) == to_one, short
    # Group order: every alv Linear before every rcr one, rcr before rar, the eval Linear last.
    groups = {short: group for group, _, short, _ in contract.RCAR_LINEARS}
    order = [g for g, _ in contract.RCAR_GROUPS]
    ranks = [order.index(groups[short]) for short, _, _ in walk]
    assert ranks == sorted(ranks) and walk[-1][0] == "we"


def test_published_settings_follow_the_public_readme():
    # kuanghuei/SCAN README, "Arguments used to train" Flickr30K and MS-COCO models.
    assert contract.scan_published("t2i", "f30k", agg="lse") == dict(
        direction="t2i", raw_norm="clipped_l2norm", agg="lse", smooth=9.0, lse_lambda=6.0)
    assert contract.SCAN_PUBLISHED["f30k"]["i2t"] == {"smooth": 4.0, "lse_lambda": 5.0}
    assert contract.SCAN_PUBLISHED["coco"]["i2t"] == {"smooth": 4.0, "lse_lambda": 20.0}
    assert contract.rcar_smooth("t2i") == 10.0 and contract.rcar_smooth("i2t") == 3.0


def test_the_cpu_heads_share_one_tile_primitive():
    # csrc/cpu/tile.h holds the region-word score GEMM and the query-axis norms; the heads are
    # epilogues on it and keep no private copy.
    for head in ("scan.cpp", "rcar.cpp"):
        code = (ROOT / "csrc" / "cpu" / head).read_text()
        assert '#include "cpu/tile.h"' in code, head
        assert "score_tile(" in code and "query_axis_norms<" in code, head
        assert not re.search(r"acc \+= [^;]*x \* x", code), f"{head} re-implements the query-axis norm"
