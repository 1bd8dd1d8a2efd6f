"""Offline compile for the H100 (no GPU needed, tests/sm90.py), with two tritons: the one
installed here (CI's) and the GPU image's (sm90.TRITON_GPU_IMAGE, installed from the package
registry into a cache folder). Every configuration the GPU launchers use (for autotuned kernels:
every config the prunes keep) must compile for sm_90 and fit its shared memory; the hot ones
(SCAN forward/backward in bf16 and fp16, RCAR, and the fp32 SCAN t2i forward the demo
runs) must not spill registers (0 bytes of stack per thread; RCAR's and its backward's measured
bounds: RCAR_STACK, RCAR_BACKWARD_STACK). Catches GPU-only failures (tl.dot
shape/dtype rules, fp16/bf16 lowering, the software pipeline's shared memory, register
pressure) in CPU-only CI.

Time: the default subset compiles about 50 kernels per triton version: 3-4.5 minutes for
both versions together on 2 CPUs with an empty triton cache (measured), seconds with a warm
one; installing triton 3.6 into the cache the first time adds a few seconds to a minute.
RCAR_FAST_SM90_FULL=1 (or RCAR_FAST_FULL_TESTS=1, the whole suite's switch) adds every caption
bucket of a COCO batch for every dtype and direction, SCAN's fp32 backward and every Gram shape
per dtype (about 10 more minutes for both versions). The default keeps the hot (no-spill)
configurations and one representative of every kernel and dtype path.
"""
import os

import pytest

from tests import sm90

FULL = "1" in (os.environ.get("RCAR_FAST_SM90_FULL"), os.environ.get("RCAR_FAST_FULL_TESTS"))


def _installed_triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# "installed": the triton of this environment (CI's); the GPU image's is installed in a cache
# folder, unless it is the installed one (on the GPU image itself).
VERSIONS = ["installed"]
if _installed_triton_version() != sm90.TRITON_GPU_IMAGE:
    VERSIONS.append(sm90.TRITON_GPU_IMAGE)


@pytest.fixture(scope="module", params=VERSIONS)
def triton_path(request):
    if not sm90.compiler_available():
        pytest.skip("triton's NVIDIA backend is not installed")
    return None if request.param == "installed" else sm90.triton_folder(request.param)


def _describe(build, *keys):
    where = " ".join(f"{k}={build[k]}" for k in keys if k in build)
    if build["error"] is not None:
        return f"{where}: {build['error']}"
    return f"{where}: shared {build['shared']} B, {build['regs']} regs, stack {build['stack']} B"


def _compile_failures(builds, *keys):
    return [_describe(b, *keys) for b in builds
            if b["error"] is not None or not 0 < b["shared"] <= sm90.H100_SHARED_BYTES]


def _spills(builds, *keys, allowed=lambda build: 0):
    """Builds whose stack exceeds what `allowed(build)` tolerates (0 bytes unless listed)."""
    return [_describe(b, *keys) + f" (allowed {allowed(b)} B)" for b in builds
            if b["error"] is None and b["stack"] > allowed(b)]


def _assert_every_config_compiles(builds, kernels, *keys):
    """Every kernel of the case was compiled, and every kept config compiles within an H100's
    shared memory."""
    assert {b["kernel"] for b in builds} == set(kernels)
    failures = _compile_failures(builds, *keys)
    assert not failures, f"{len(failures)} of {len(builds)} configurations fail:\n" + "\n".join(failures)


def _assert_hot_configs_do_not_spill(builds, *keys):
    hot = [b for b in builds if b["hot"]]
    assert hot
    spills = _spills(hot, *keys)
    assert not spills, f"{len(spills)} of {len(hot)} hot configurations spill:\n" + "\n".join(spills)


# No spill is tolerated in a hot configuration (0 B of stack with triton 3.6 and 3.8; RCAR's
# measured exceptions in RCAR_STACK). What it took (issue 11), should one come back: at 64 rows
# and 8 warps, triton's rule for a dot whose result reaches another dot (all warps along M)
# replicated the SCAN backward epilogue and RCAR's attention across warp pairs, undone by
# computing those dots in a branch (kernels/scan.py _forward_tile, kernels/rcar.py
# _dot_in_branch); RCAR then needed 32-wide d chunks, one stage and the alignment GEMM in
# column groups, and at 128 rows (stop 20) its tile state in the scratch, run-time step loops
# and opaque offsets (kernels/rcar.py GPU_ROWS).


# ---------------------------------------------------------------------------------------------
# SCAN: forward and both backward kernels, every config the autotuners keep
# ---------------------------------------------------------------------------------------------

# (direction, dtype, raw_norm, agg, caption lengths, kernels compiled, hot kernels: no spills).
# The launchers bucket captions by power-of-two length, one launch (and autotune key) per
# bucket. Lengths (50,) give the Lmax bucket of a COCO batch (C_PAD = Q_PAD = 64: the largest
# tiles per owner), 12 the most common one (t2i Q_PAD 16, up to 16 captions per tile); the
# demo's captions (6..30 words, float32, forward only) fall in the t2i buckets Q_PAD 8, 16, 32.
BOTH = ("fwd", "bwd_x", "bwd_y")
SCAN_CASES = [
    ("t2i", "bf16", "clipped_l2norm", "mean", (12, 50), BOTH, BOTH),  # SCAN t2i as trained
    ("i2t", "fp16", "softmax", "lse", (50,), BOTH, BOTH),
    ("t2i", "fp32", "clipped_l2norm", "mean", (7, 12, 23), ("fwd",), ("fwd",)),  # the demo
]
if FULL:
    SCAN_CASES += [("i2t", "fp32", "l1norm", "max", (50,), BOTH, ())]  # the exact fp32 (FMA) backward
    SCAN_CASES += [(direction, dtype, "clipped_l2norm", agg, (7, 12, 23, 50), BOTH,
                    BOTH if dtype != "fp32" else ())
                   for direction, agg in (("t2i", "mean"), ("i2t", "lse"))
                   for dtype in ("fp32", "fp16", "bf16")]

_SCAN_SCRIPT = r"""
import json, sys
import torch
from rcar_fast.kernels import scan as kernels
from tests import sm90

# The context Gram matrices come from the Gram kernel (compiled below); only their shape, dtype
# and strides matter here.
kernels.context_gram = lambda x: torch.zeros(x.shape[0], x.shape[1], x.shape[1])
recorders = dict(zip(("fwd", "bwd_x", "bwd_y"),
                     sm90.record(kernels, "_fwd_tuned", "_bwd_x_tuned", "_bwd_y_tuned")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
cases = json.loads(sys.argv[1])
launches, owners = [], []
for case, (direction, dtype, raw_norm, agg, lens, names, hot) in enumerate(cases):
    for rec in recorders.values():
        rec.launches.clear()
    # The real launchers (TRITON_INTERPRET unset: their GPU path) on CPU tensors, recorded.
    img = torch.randn(4, 36, 1024).to(DTYPES[dtype])
    cap = torch.randn(len(lens), max(lens), 1024).to(DTYPES[dtype])
    problem = kernels.build_problem(img, cap, torch.tensor(lens), direction=direction,
                                    raw_norm=raw_norm, smooth=9.0, agg=agg, lse_lambda=6.0)
    kernels.scan_forward(problem)
    if set(names) - {"fwd"}:
        kernels.scan_backward(problem, torch.ones(problem.n_img, problem.n_cap), True, True)
    for name in names:
        sm90.add_recorded(recorders[name], launches, owners, ("C_PAD", "Q_PAD"), case=case, kernel=name,
                          hot=name in hot)
sm90.emit_by_case(launches, owners, len(cases))
"""

_SCAN_KEYS = ("kernel", "C_PAD", "Q_PAD", "config")


@pytest.fixture(scope="module")
def scan_builds(triton_path):
    return sm90.run_offline(_SCAN_SCRIPT, SCAN_CASES, timeout=6 * 3600 if FULL else 1500,
                            triton_path=triton_path)


@pytest.mark.parametrize("index", range(len(SCAN_CASES)),
                         ids=["-".join(map(str, c[:4])) + f"-L{','.join(map(str, c[4]))}"
                              for c in SCAN_CASES])
def test_scan_configurations_compile_for_sm90(scan_builds, index):
    _assert_every_config_compiles(scan_builds[index], SCAN_CASES[index][5], *_SCAN_KEYS)


@pytest.mark.parametrize("index", [i for i, c in enumerate(SCAN_CASES) if c[6]],
                         ids=["-".join(map(str, c[:4])) + f"-L{','.join(map(str, c[4]))}"
                              for c in SCAN_CASES if c[6]])
def test_scan_hot_configurations_do_not_spill(scan_builds, index):
    _assert_hot_configs_do_not_spill(scan_builds[index], *_SCAN_KEYS)


# ---------------------------------------------------------------------------------------------
# RCAR: every tile of the GPU tile space (kernels/rcar.py GPU_TILES) per (direction, dtype)
# ---------------------------------------------------------------------------------------------

# (direction, regulator, steps, operand dtype, sim_dim, hot: held to RCAR_STACK). bf16 / fp16
# run 128-row work items (kernels/rcar.py GPU_ROWS: t2i ~10 captions, i2t 3 images), fp32 64.
RCAR_CASES = [
    ("t2i", "coop_rcar", 2, "bf16", 256, True),   # the COCO 5K target configuration
    ("i2t", "coop_rcar", 2, "bf16", 256, True),   # 128-row tiles of 3 images (36 regions)
    ("t2i", "coop_rcar", 2, "fp16", 256, True),   # the same "low" tiles as bf16
    ("t2i", "coop_rcar", 2, "bf16", 64, True),
    ("t2i", "only_rar", 2, "bf16", 256, True),
    ("i2t", "only_rcr", 2, "bf16", 256, True),
    ("t2i", "coop_rcar", 2, "fp32", 256, True),   # the exact fp32 FMA path (64 rows)
    ("i2t", "only_rcr", 2, "fp32", 256, False),
]
# Bytes of stack per thread (register spills) a hot build may have, per triton version and
# (regulator, sim_dim, dtype, tile), measured (kernels/rcar.py GPU_ROWS has the table); 0 where
# not listed: every hot build with the GPU image's triton 3.6, and with 3.8 all but the 128-row
# kernels below (1-6 stores per work item, nearly all outside the GEMM loops). Lower them when
# the kernel improves; raise them only with a reason.
RCAR_STACK = {
    "3.8": {("coop_rcar", 256, "bf16", 0): 8, ("coop_rcar", 256, "fp16", 0): 16,
            ("only_rar", 256, "bf16", 0): 24,
            ("coop_rcar", 256, "bf16", 1): 8, ("coop_rcar", 256, "fp16", 1): 8},
    "3.6": {},
}


def _rcar_stack_bound(build, regulator, sim_dim, op):
    version = ".".join(build["triton"].split(".")[:2])
    assert version in RCAR_STACK, f"no stack bound measured for triton {version}: measure it ({build})"
    return RCAR_STACK[version].get((regulator, sim_dim, op, build["tile"]), 0)


# The launcher needs a GPU (its programs per SM): the kernel is compiled from the launch
# configuration of each tile and a signature typed as rcar_forward's arguments are. One list
# of builds per case, one build per tile.
_RCAR_SCRIPT = r"""
import inspect, json, sys
import torch, triton
from triton.compiler import ASTSource
from rcar_fast.kernels import rcar as kernels
from tests import sm90

F32_PTRS = {"gram", "ba", "b1", "b2", "bs1", "ws2", "bs2", "bq", "bk", "wv", "bv", "we", "be", "out"}
INT_PTRS = {"c_count", "tile_seg", "tile_items", "tile_set"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def build(direction, regulator, steps, op, sim_dim, hot, tile):
    dims = kernels.padded_dims(1024, sim_dim, interpreter=False)
    cfg = kernels.launch_config(direction, 36, [12, 50, 1, 9, 23], regulator, steps, dims,
                                DTYPES[op], interpreter=False, tile=tile)
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    signature = {}
    for name in inspect.signature(kernels._rcar_kernel.fn).parameters:
        base = name[:-4]
        if name in cfg:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if base in F32_PTRS else "*i32" if base in INT_PTRS else "*" + op
        else:
            signature[name] = "fp32" if name == "smooth" else "i32"
    # As the launcher specialises them: 16-byte aligned pointers, DP and strides multiples of 16.
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n in ("DP", "stride_c_set")}
    try:
        compiled = triton.compile(ASTSource(kernels._rcar_kernel, signature, constexprs=cfg,
                                            attrs=attrs),
                                  target=sm90._target()[0], options=options)
        result = dict(shared=compiled.metadata.shared, error=None,
                      **sm90.resource_usage(compiled.asm["cubin"]))
    except Exception as err:  # reported by the test
        result = sm90._error(err)
    return dict(result, tile=tile, config=dict(cfg, **options), hot=hot, triton=triton.__version__)


sm90.emit([[build(*case, tile) for tile in range(len(kernels.gpu_tiles(DTYPES[case[3]])))]
           for case in json.loads(sys.argv[1])])
"""


@pytest.fixture(scope="module")
def rcar_builds(triton_path):
    return sm90.run_offline(_RCAR_SCRIPT, RCAR_CASES, triton_path=triton_path)


@pytest.mark.parametrize("index", range(len(RCAR_CASES)),
                         ids=["-".join(map(str, c[:5])) for c in RCAR_CASES])
def test_rcar_configuration_compiles_for_sm90(rcar_builds, index):
    builds = rcar_builds[index]
    assert len(builds) >= 1
    failures = _compile_failures(builds, "tile", "config")
    assert not failures, f"{len(failures)} of {len(builds)} tiles fail:\n" + "\n".join(failures)
    _, regulator, _, op, sim_dim, hot = RCAR_CASES[index]
    if hot:
        spills = _spills(builds, "tile", "config",
                         allowed=lambda b: _rcar_stack_bound(b, regulator, sim_dim, op))
        assert not spills, "\n".join(spills)


def test_occupancy_counts_registers_shared_memory_and_threads():
    from rcar_fast.kernels import rcar

    assert rcar.occupancy(255, 90112, 8) == 1       # 255 -> 256 registers x 256 threads: 64K
    assert rcar.occupancy(128, 49152, 8) == 2       # 32K registers each
    assert rcar.occupancy(114, 20000, 16) == 1      # 120 x 512 = 60K: no second 512-thread CTA
    assert rcar.occupancy(32, 120000, 4) == 1       # shared memory: 2 x 121 KB > 228 KB
    assert rcar.occupancy(32, 0, 4) == 16           # threads: 2048 / 128


def test_rcar_fallback_programs_per_sm_matches_the_compiled_kernels(rcar_builds):
    """kernels/rcar.py launches occupancy(compiled kernel) programs per SM and falls back to
    GPU_PROGRAMS_PER_SM: that constant must be what every compiled GPU configuration allows
    (more programs than fit at once would run as a second, partial wave)."""
    from rcar_fast.kernels import rcar

    builds = [b for case in rcar_builds for b in case]
    fits = [rcar.occupancy(b["regs"], b["shared"], b["config"]["num_warps"]) for b in builds]
    assert rcar.GPU_PROGRAMS_PER_SM == min(fits), list(zip(fits, map(_describe, builds,
                                                                  ["config"] * len(fits))))


# ---------------------------------------------------------------------------------------------
# RCAR's fused backward (kernels/rcar_backward.py): the launches of one training step
# ---------------------------------------------------------------------------------------------

# (regulator, steps, direction, dtype, n_img, n_cap) at d = 1024, sim_dim 256, R = 36, captions
# of up to 50 words (64 x 64 pair tiles). The recipe's step: a square batch, so the weight
# gradients ride with the d query pass; 4 x 5 puts them on the d context pass instead.
RCAR_BACKWARD_CASES = [("coop_rcar", 2, "t2i", "bf16", 5, 5)]
if FULL:
    RCAR_BACKWARD_CASES += [("coop_rcar", 2, "t2i", "bf16", 4, 5), ("coop_rcar", 2, "i2t", "bf16", 5, 5),
                            ("only_rar", 2, "t2i", "bf16", 5, 5), ("only_rcr", 2, "i2t", "bf16", 5, 5),
                            ("coop_rcar", 2, "t2i", "fp32", 5, 5)]
# Regression guard: the bytes of stack per thread (register spills) measured for the recipe's
# launches (236-255 registers), per triton version. Before the rewrite into fixed column chunks
# (stop 19) this kernel spilled 1.1-3.6 KB per thread at sim_dim 64 and did not finish
# compiling at sim_dim 128 within 7 minutes (kernels/rcar_backward.py GPU_LAUNCH has the
# steps in between). Lower it when the kernel improves; raise it only with a reason.
RCAR_BACKWARD_STACK = {"3.8": {"forward": 0, "d_query": 0, "d_context": 8},
                       "3.6": {"forward": 0, "d_query": 96, "d_context": 0}}
# The pair list's launches (LISTED, the sparse loss's recompute): with 3.8 the same (216 / 255 /
# 255 registers), with 3.6 the d query pass 8 B more (its partner list's bounds).
RCAR_BACKWARD_STACK_LISTED = {"3.8": RCAR_BACKWARD_STACK["3.8"],
                              "3.6": dict(RCAR_BACKWARD_STACK["3.6"], d_query=104)}

_RCAR_BACKWARD_SCRIPT = r"""
import json, sys
import torch, triton
from rcar_fast.heads import module_counts
from rcar_fast.kernels import rcar_backward as kernels
from rcar_fast.modules import RCARSimilarity
from rcar_fast.ops.rcar import pack_weights
from tests import sm90

(recorder,) = sm90.record(kernels, "_rcar_pair_kernel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
launches, owners = [], []
cases = json.loads(sys.argv[1])
for case, (regulator, steps, direction, dtype, n_img, n_cap) in enumerate(cases):
    recorder.launches.clear()
    head = RCARSimilarity(embed_dim=1024, sim_dim=256, regulator=regulator, steps=steps,
                          direction=direction)
    img = torch.zeros(n_img, 36, 1024, dtype=DTYPES[dtype])
    cap = torch.zeros(n_cap, 50, 1024, dtype=DTYPES[dtype])
    lens = [50, 12, 1, 9, 23][:n_cap]
    weights = pack_weights(head, torch.float32, False)
    options = dict(regulator=regulator, steps=steps, module_counts=module_counts(regulator, steps),
                   direction=direction, smooth=10.0, seed=5, dropout_on=regulator != "only_rcr")
    # The real launcher on CPU tensors, recorded: the training forward (dropout), then both
    # backward passes; for the recipe's case also the sparse loss's pair recompute (LISTED:
    # the positives and some hardest negatives).
    kernels.run(img, cap, lens, weights, **options)
    kernels.run(img, cap, lens, weights, grad=torch.ones(n_img, n_cap), **options)
    if case == 0:
        pairs = (torch.tensor([0, 1, 2, 3, 4, 0, 1]), torch.tensor([0, 1, 2, 3, 4, 3, 0]))
        kernels.run(img, cap, lens, weights, pairs=pairs, **options)
        kernels.run(img, cap, lens, weights, pairs=pairs, grad=torch.ones(7), **options)
    for nargs, kwargs in recorder.launches:
        # CPU tensors give the interpreter's exact fp32 GEMMs; a GPU launch's are tf32
        kwargs = dict(kwargs, PREC=kernels.operand_dtypes(DTYPES[dtype], torch.device("cuda"))[2])
        name = ("forward" if kwargs["FORWARD_ONLY"] else
                "d_query" if kwargs["OWNER_IS_QUERY"] else "d_context")
        launches.append((recorder.jit_fn, {**nargs, **kwargs}, None))
        owners.append(dict(case=case, kernel=name, weights=kwargs["WANT_W"],
                           listed=kwargs["LISTED"], triton=triton.__version__))
sm90.emit_by_case(launches, owners, len(cases))
"""


@pytest.fixture(scope="module")
def rcar_backward_builds(triton_path):
    return sm90.run_offline(_RCAR_BACKWARD_SCRIPT, RCAR_BACKWARD_CASES, timeout=1500,
                            triton_path=triton_path)


@pytest.mark.parametrize("index", range(len(RCAR_BACKWARD_CASES)),
                         ids=["-".join(map(str, c)) for c in RCAR_BACKWARD_CASES])
def test_rcar_backward_compiles_for_sm90_within_its_stack_bound(rcar_backward_builds, index):
    builds = rcar_backward_builds[index]
    assert {b["kernel"] for b in builds} == {"forward", "d_query", "d_context"}
    failures = _compile_failures(builds, "kernel", "weights", "listed")
    assert not failures, "\n".join(failures)
    if index == 0:   # the recipe's step (all pairs and a pair list): its measured stack
        assert sorted(b["listed"] for b in builds) == [False] * 3 + [True] * 3
        version = ".".join(builds[0]["triton"].split(".")[:2])
        assert version in RCAR_BACKWARD_STACK, (f"no stack bound measured for triton {version}: "
                                                f"measure it (these builds: {builds}) and add it")
        bounds = {False: RCAR_BACKWARD_STACK[version], True: RCAR_BACKWARD_STACK_LISTED[version]}
        spills = _spills(builds, "kernel", "weights", "listed",
                         allowed=lambda b: bounds[b["listed"]][b["kernel"]])
        assert not spills, "\n".join(spills)


# ---------------------------------------------------------------------------------------------
# Gram: the kernel as gram() launches it on a GPU, every input dtype
# ---------------------------------------------------------------------------------------------

# (dtype, R): R=36 regions (64-row tiles, also Lmax=50 captions), R=7 (16-row tiles); by
# default each dtype once and each tile once, every pair with FULL
GRAM_CASES = [("bfloat16", 36), ("float16", 7), ("float32", 36)]
if FULL:
    GRAM_CASES = [(dtype, n) for dtype in ("float32", "float16", "bfloat16") for n in (36, 7)]

_GRAM_SCRIPT = r"""
import json, sys
import torch
from rcar_fast.kernels import gram as kernels
from tests import sm90

(launcher,) = sm90.record(kernels, "_gram_kernel")
results = []
for dtype, n_rows in json.loads(sys.argv[1]):
    launcher.launches.clear()
    # meta tensors take gram()'s GPU path (its tile choice) without allocating anything
    kernels.gram(torch.empty(4, n_rows, 1024, dtype=getattr(torch, dtype), device="meta"))
    (nargs, kwargs), = launcher.launches
    results.append(dict(kwargs, **sm90.compile_launch(launcher.jit_fn, {**nargs, **kwargs})))
sm90.emit(results)
"""


@pytest.fixture(scope="module")
def gram_builds(triton_path):
    return sm90.run_offline(_GRAM_SCRIPT, GRAM_CASES, timeout=600, triton_path=triton_path)


@pytest.mark.parametrize("index", range(len(GRAM_CASES)), ids=[f"{d}-R{n}" for d, n in GRAM_CASES])
def test_gram_gpu_launch_compiles_for_sm90(gram_builds, index):
    build = gram_builds[index]
    assert not _compile_failures([build]), f"{GRAM_CASES[index]}: {_describe(build)}"


def test_the_second_triton_is_the_gpu_images(triton_path):
    """The scratch folder really holds the GPU image's triton (and the installed one is what
    this process imports), so the two runs compile with different compilers."""
    expected = _installed_triton_version() if triton_path is None else sm90.TRITON_GPU_IMAGE
    assert sm90.triton_version_of(triton_path) == expected


# ---------------------------------------------------------------------------------------------
# The S-only heads (kernels/maxsim.py): forward and both backward kernels, every kept config
# ---------------------------------------------------------------------------------------------

# (direction, dtype, pool, leaky, R, caption lengths, d, kernels compiled, hot kernels: no
# spills). R=36 regions pad to 64; lengths 12 and 50 are COCO's common and longest caption
# buckets (L_PAD 16 and 64): ALADIN / ColBERT MrSw (t2i sum) and LAPS (both mean leaky) in bf16
# and fp16, i2t softmax, CHAN's lse on the fp32 FMA path, and the ColBERT document shape (300
# tokens as regions, 32-token queries, d=128). Every kept config of every case is held to 0 B
# of stack (registers per thread: kernels/maxsim.py, _LIMITS).
# The pair kernels (maxsim_pairs: "pairs_fwd", "pairs_bwd" for both sides) have one config.
# An optional last item holds further build_problem settings (CHAN's VSA coding: its own
# budgets, kernels/maxsim.py _VSA_LIMITS).
MAXSIM_BOTH = ("fwd", "bwd_img", "bwd_cap")
MAXSIM_PAIRS = ("pairs_fwd", "pairs_bwd")
MAXSIM_CASES = [
    ("t2i", "bf16", "sum", False, 36, (12, 50), 1024, MAXSIM_BOTH + MAXSIM_PAIRS,
     MAXSIM_BOTH + MAXSIM_PAIRS),
    ("both", "fp16", "mean", True, 36, (12, 50), 1024, MAXSIM_BOTH, MAXSIM_BOTH),
    ("i2t", "bf16", "softmax", False, 36, (12,), 1024, MAXSIM_BOTH, MAXSIM_BOTH),
    ("t2i", "fp32", "lse", False, 36, (12, 50), 1024, MAXSIM_BOTH + MAXSIM_PAIRS,
     MAXSIM_BOTH + MAXSIM_PAIRS),
    ("t2i", "bf16", "sum", False, 300, (32,), 128, ("fwd",), ("fwd",)),
    ("i2t", "bf16", "mean", False, 36, (12, 50), 1024, MAXSIM_BOTH + MAXSIM_PAIRS,
     MAXSIM_BOTH + MAXSIM_PAIRS, {"coding": "vsa"}),
    ("i2t", "fp32", "lse", False, 36, (12, 50), 1024, MAXSIM_BOTH + MAXSIM_PAIRS,
     MAXSIM_BOTH + MAXSIM_PAIRS, {"coding": "vsa"}),
]

_MAXSIM_SCRIPT = r"""
import json, sys
import torch
from rcar_fast.kernels import maxsim as kernels
from tests import sm90

# VSA's caption Gram matrices come from the Gram kernel; only their shape and dtype matter here.
kernels.context_gram = lambda x: torch.zeros(x.shape[0], x.shape[1], x.shape[1])
recorders = dict(zip(("fwd", "bwd_img", "bwd_cap", "pairs_fwd", "pairs_bwd"),
                     sm90.record(kernels, "_fwd_tuned", "_bwd_img_tuned", "_bwd_cap_tuned",
                                 "_maxsim_pairs_fwd_kernel", "_maxsim_pairs_bwd_kernel")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
cases = json.loads(sys.argv[1])
launches, owners = [], []
for case, (direction, dtype, pool, leaky, regions, lens, d, names, hot, *more) in enumerate(cases):
    settings = dict(direction=direction, pool=pool, tau=0.1, leaky=leaky, both_scale=0.5,
                    **(more[0] if more else {}))
    for rec in recorders.values():
        rec.launches.clear()
    # The real launchers (TRITON_INTERPRET unset: their GPU path) on CPU tensors, recorded.
    img = torch.randn(4, regions, d).to(DTYPES[dtype])
    cap = torch.randn(len(lens), max(lens), d).to(DTYPES[dtype])
    problem = kernels.build_problem(img, cap, torch.tensor(lens), torch.full((4,), regions),
                                    **settings)
    kernels.maxsim_forward(problem)
    if {"bwd_img", "bwd_cap"} & set(names):
        kernels.maxsim_backward(problem, torch.ones(4, len(lens)), True, True)
    if "pairs_fwd" in names:   # every (image, caption) pair, listed
        img_idx = torch.arange(4).repeat_interleave(len(lens))
        pairs = kernels.build_pairs_problem(
            img, cap, torch.tensor(lens), torch.full((4,), regions), img_idx,
            torch.arange(len(lens)).repeat(4), **settings)
        kernels.maxsim_pairs_forward(pairs)
        kernels.maxsim_pairs_backward(pairs, torch.ones(len(img_idx)), True, True)
    for name in names:
        sm90.add_recorded(recorders[name], launches, owners, ("R_PAD", "L_PAD"), case=case, kernel=name,
                          hot=name in hot)
sm90.emit_by_case(launches, owners, len(cases))
"""

_MAXSIM_KEYS = ("kernel", "R_PAD", "L_PAD", "config")
_MAXSIM_IDS = ["-".join(map(str, c[:4])) + f"-R{c[4]}-L{','.join(map(str, c[5]))}"
               + "".join(f"-{v}" for v in (c[9] if len(c) > 9 else {}).values())
               for c in MAXSIM_CASES]


@pytest.fixture(scope="module")
def maxsim_builds(triton_path):
    return sm90.run_offline(_MAXSIM_SCRIPT, MAXSIM_CASES, timeout=3000, triton_path=triton_path)


@pytest.mark.parametrize("index", range(len(MAXSIM_CASES)), ids=_MAXSIM_IDS)
def test_maxsim_configurations_compile_for_sm90(maxsim_builds, index):
    _assert_every_config_compiles(maxsim_builds[index], MAXSIM_CASES[index][7], *_MAXSIM_KEYS)


@pytest.mark.parametrize("index", [i for i, c in enumerate(MAXSIM_CASES) if c[8]],
                         ids=[i for i, c in zip(_MAXSIM_IDS, MAXSIM_CASES) if c[8]])
def test_maxsim_hot_configurations_do_not_spill(maxsim_builds, index):
    _assert_hot_configs_do_not_spill(maxsim_builds[index], *_MAXSIM_KEYS)
