"""The S-only heads and late-interaction MaxSim (issue 14): `python -m bench --maxsim`.

Two groups of rows, appended to the suite's CSV (bench/results/<device>.csv, same columns):

* heads (`op` head_chan / head_mrsw / head_laps; forward, backward, train_step): CHAN (t2i,
  lse, tau 0.1), MrSw (t2i, sum: ALADIN / TERAN / DVSA / ColBERT without the normalisation)
  and LAPS (both, mean, leaky, unit, both_scale 1) through `rcar_fast.max_similarity` on every
  backend dispatch has for op "maxsim" (reference, reference_loop, cpu, triton, cuda, as
  registered), against `naive_padded`: the padded matmul + mask + max a user writes in torch
  (one GEMM per chunk of images materialising (chunk, R, n_cap, L), autograd for the gradient).
* late interaction (`op` maxsim; forward): `rcar_fast.maxsim(q, d, q_lens, d_lens)` against
  `einsum_pylate` (PyLate's colbert_scores algorithm: the (A, B, Lq, Ld) einsum, here in chunks
  of bounded size, max over document tokens, sum over query tokens), `maxsim_cpu` (PyPI
  maxsim-cpu, when importable; one query against all documents per call, as its API takes),
  and on a GPU `flash_maxsim` (PyPI flash-maxsim, flash_maxsim_batched) and
  `late_interaction_kernels` (PyPI late-interaction-kernels, maxsim with masks) when
  importable. A peer that is missing gets `skipped` rows with the reason.
  Columns: n_img = documents (images), n_cap = queries (captions), regions = Ld, mean_len /
  max_len = the query lengths; sweep "coco" (R = 36 region documents, COCO caption queries,
  d = 1024), "colbert" (Lq = 32, Ld = 300, d = 128, every token real).

Also per run: `ceiling_matmul` rows (an n x n fp32 matmul, at the start and at the end of the
run: on a shared machine the rate moves); every measured row gets `ceiling_tflops` (the higher
of the two) and `pct_ceiling` (its model TFLOP/s as % of it).

FLOPs (model, the same for every backend and baseline): 2 R_i L_j d per pair for the score
tile (real lengths; "both" reads one tile), the epilogue not counted; backward 2x and training
step 3x, the suite's convention (bench/flops.py), although a flash-style backward needs only
one recomputed tile plus sparse argmax scatters.

Memory: the suite's method (bench/measure.py: the resident-set high-water mark over the call,
glibc set to mmap and return every block >= 64 KiB during that call, so the RSS follows live
tensors; smaller allocations do not show). The summary also gives peak minus the output's
size: O(tile) means that stays flat as the pair count grows.

Ratios against the other baselines (speedup_vs_reference[_loop] are the suite's columns) are
in `detail` ("x2.5 vs naive_padded; ...") and in the summary `<device>.maxsim.md`; the suite's
own `<device>.md` (summary of its latest run) is left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from bench import cases as _cases
from bench import device as device_facts
from bench import measure, report

MODES = ("forward", "backward", "train_step")
MODE_FACTOR = {"forward": 1.0, "backward": 2.0, "train_step": 3.0}

# The heads measured: row label -> max_similarity settings (HEADS.md; contract.HEAD_PRESETS).
HEADS = {
    "head_chan": dict(preset="chan"),
    "head_mrsw": dict(direction="t2i", pool="sum"),
    "head_laps": dict(preset="laps"),
}

NAIVE = "naive_padded"
EINSUM = "einsum_pylate"
# Peer packages: row backend -> (import name, pip name, needs a CUDA GPU).
PEERS = {
    "maxsim_cpu": ("maxsim_cpu", "maxsim-cpu", False),
    "flash_maxsim": ("flash_maxsim", "flash-maxsim", True),
    "late_interaction_kernels": ("late_interaction_kernels", "late-interaction-kernels", True),
}
OUR_BACKENDS = ("cpu", "triton", "cuda")


# One shape: the suite's (bench.cases.Shape). Heads: images (n_img, regions, d) x captions
# (n_cap, lengths, d). MaxSim: documents = images (n_img, regions = Ld), queries = captions
# (n_cap, Lq = mean_len). Lengths: "coco", "uniform" or "fixed" (every query mean_len long).
Problem = _cases.Shape


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                      # "head_..." or "maxsim"
    modes: tuple
    problems: tuple


@dataclasses.dataclass(frozen=True)
class MaxSimPlan:
    """What bench.suite.measure_into reads of a plan, plus the cases of this module."""
    name: str
    cases: tuple
    gemm_n: int
    budget_s: float
    min_repeats: int
    max_repeats: int
    skip_after_s: float
    chunk_bytes: int             # the naive / einsum baselines' chunk size
    baseline_max_pairs: tuple = ()
    single_call_over_s: Optional[float] = None
    warmup_only_over_s: Optional[float] = None
    compile: Optional[str] = "not measured here"

    def baseline_limit(self, backend: str) -> Optional[int]:
        return dict(self.baseline_max_pairs).get(backend)


def _heads(modes, problems):
    return tuple(Case(op, modes, problems) for op in HEADS)


def tiny_plan() -> MaxSimPlan:
    """Seconds: every code path once (tests/test_bench_maxsim.py)."""
    f32 = torch.float32
    heads = (Problem(3, 6, 6, 4, 16, f32, "pairs", "uniform"),)
    late = (Problem(4, 6, 6, 4, 16, f32, "coco", "uniform"),
            Problem(5, 2, 7, 4, 16, f32, "colbert", "fixed"))
    return MaxSimPlan("maxsim-tiny", _heads(MODES, heads) + (Case("maxsim", ("forward",), late),),
                      gemm_n=64, budget_s=0.0, min_repeats=1, max_repeats=1, skip_after_s=30.0,
                      chunk_bytes=2**12)


def quick_plan() -> MaxSimPlan:
    """About 15 minutes on one core of the 2-core Xeon: the COCO shape (R = 36, COCO caption
    lengths, d = 1024) scaled down to 64 x 320 pairs (all heads and modes) and 200 x 1000
    (MrSw and maxsim forward), the ColBERT shape (Lq 32, Ld 300, d 128) at 1 and 32 queries x
    2,000 documents (1 and 1,000 x 10K scaled down). Calls over 3 s are timed once (the
    memory call), after their warm-up; a warm-up over 30 s is the measurement (maxsim-cpu at
    the COCO shape takes minutes)."""
    f32 = torch.float32
    small = Problem(64, 320, 36, 12, 1024, f32, "pairs", "coco")
    large = Problem(200, 1000, 36, 12, 1024, f32, "pairs", "coco")
    late = (Problem(200, 1000, 36, 12, 1024, f32, "coco", "coco"),
            Problem(2000, 1, 300, 32, 128, f32, "colbert", "fixed"),
            Problem(2000, 32, 300, 32, 128, f32, "colbert", "fixed"))
    heads = _heads(MODES, (small,)) + (Case("head_mrsw", ("forward",), (large,)),)
    return MaxSimPlan("maxsim-quick", heads + (Case("maxsim", ("forward",), late),), gemm_n=2048,
                      budget_s=1.0, min_repeats=1, max_repeats=5, skip_after_s=60.0,
                      chunk_bytes=256 * 2**20, baseline_max_pairs=(("reference_loop", 2000),),
                      single_call_over_s=3.0, warmup_only_over_s=30.0)


def full_plan() -> MaxSimPlan:
    """A GPU: COCO 5K MrSw all pairs (5,000 x 25,000, bf16 and fp32), the heads at 1,000 x
    5,000, ColBERT 1 and 1,000 queries x 10,000 documents; slow baselines at small sizes."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        small = Problem(1000, 5000, 36, 12, 1024, dtype, "pairs", "coco")
        # Not the suite's "coco5k" sweep: that one switches the summary to the GPU check's format.
        coco5k = Problem(5000, 25000, 36, 12, 1024, dtype, "coco-5k", "coco")
        rows += list(_heads(MODES, (small,)))
        rows.append(Case("head_mrsw", ("forward",), (coco5k,)))
        rows.append(Case("maxsim", ("forward",), (
            Problem(5000, 25000, 36, 12, 1024, dtype, "coco", "coco"),
            Problem(10000, 1, 300, 32, 128, dtype, "colbert", "fixed"),
            Problem(10000, 1000, 300, 32, 128, dtype, "colbert", "fixed"))))
    return MaxSimPlan("maxsim-full", tuple(rows), gemm_n=8192, budget_s=1.0, min_repeats=3,
                      max_repeats=100, skip_after_s=30.0, chunk_bytes=2 * 2**30,
                      baseline_max_pairs=(("reference_loop", 500), ("reference", 1000 * 5000),
                                          (NAIVE, 1000 * 5000), (EINSUM, 1000 * 10000)),
                      single_call_over_s=2.0, warmup_only_over_s=45.0)


def select_plan(args, dev: torch.device) -> MaxSimPlan:
    if args.tiny:
        plan = tiny_plan()
    elif args.full or (not args.quick and dev.type == "cuda"):
        plan = full_plan()
    else:
        plan = quick_plan()
    if args.ops:
        keep = set(v.strip() for v in args.ops.split(","))
        plan = dataclasses.replace(plan, cases=tuple(c for c in plan.cases if c.op in keep))
    return plan


# ---------------------------------------------------------------------------------------------
# Inputs and FLOPs
# ---------------------------------------------------------------------------------------------

def query_lengths(problem: Problem, seed: int = 0) -> torch.Tensor:
    if problem.lengths == "fixed":
        return torch.full((problem.n_cap,), problem.mean_len, dtype=torch.int64)
    return _cases.caption_lengths(problem.n_cap, problem.mean_len, problem.lengths, seed)


def make_inputs(problem: Problem, device: torch.device, seed: int = 0):
    """(img, cap, lens, img_lens): unit vectors made on the device in the dtype, zeros in the
    caption padding (bench.cases.device_inputs); every region / document token real."""
    lens = query_lengths(problem, seed)
    img, cap = _cases.device_inputs(problem.n_img, problem.regions, lens, problem.d, problem.dtype,
                                    device, seed)
    img_lens = torch.full((problem.n_img,), problem.regions, dtype=torch.int64, device=device)
    return img, cap, lens.to(device), img_lens


def tile_flops(problem: Problem, lens: torch.Tensor) -> float:
    """2 R L_j d per pair over the real words: the score tile (every region is real)."""
    return 2.0 * problem.n_img * problem.regions * float(lens.sum()) * problem.d


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------

def naive_padded_head(img, cap, lens, *, chunk_bytes: int, direction="t2i", pool="mean", tau=0.1,
                      leaky=False, normalize="none", both_scale=0.5, preset=None):
    """The head as a user writes it in torch: per chunk of images one padded GEMM giving
    (chunk, R, n_cap, L), padded words masked (-inf for the max, 0 for the pools), plain amax,
    autograd for the gradient. Caption padding must be zeros (no NaN)."""
    from rcar_fast.contract import HEAD_PRESETS
    from rcar_fast.reference_heads import normalize_inputs, pool_values, real_rows
    from rcar_fast.reference_math import leaky as leaky_relu

    if preset is not None:
        settings = dict(dict(direction="t2i", pool="mean", tau=0.1, leaky=False, normalize="none",
                             both_scale=0.5), **HEAD_PRESETS[preset])
        direction, pool, tau, leaky = (settings[k] for k in ("direction", "pool", "tau", "leaky"))
        normalize, both_scale = settings["normalize"], settings["both_scale"]
    n_img, R, d = img.shape
    n_cap, L, _ = cap.shape
    img_lens = torch.full((n_img,), R, dtype=torch.int64, device=img.device)
    img, cap = normalize_inputs(img, cap, lens, img_lens, normalize)
    word_real = real_rows(lens, L)                                      # (n_cap, L)
    words = cap.reshape(n_cap * L, d).T
    step = max(1, chunk_bytes // max(1, R * n_cap * L * img.element_size()))
    rows = []
    for i0 in range(0, n_img, step):
        tile = (img[i0:i0 + step].reshape(-1, d) @ words).view(-1, R, n_cap, L)
        parts = []
        if direction in ("t2i", "both"):
            maxima = tile.amax(dim=1)                                   # (ci, n_cap, L)
            parts.append(pool_values(leaky_relu(maxima) if leaky else maxima, pool, tau, word_real))
        if direction in ("i2t", "both"):
            masked = tile.masked_fill(~word_real[None, None], float("-inf"))
            maxima = masked.amax(dim=3).transpose(1, 2)                 # (ci, n_cap, R)
            parts.append(pool_values(leaky_relu(maxima) if leaky else maxima, pool, tau))
        rows.append(parts[0] if len(parts) == 1 else both_scale * (parts[0] + parts[1]))
    return torch.cat(rows).float() if img.dtype != torch.float64 else torch.cat(rows)


def einsum_maxsim(q, d, q_lens, d_lens, *, chunk_bytes: int):
    """PyLate colbert_scores' algorithm: scores[a, b] = sum_s max_t q[a, s] . d[b, t] from the
    (A, B, Lq, Ld) einsum, here in chunks of at most chunk_bytes (the whole tensor does not fit
    at these shapes), padded document tokens -inf, padded query tokens 0. (n_q, n_d)."""
    from rcar_fast.reference_heads import real_rows

    n_q, Lq, _ = q.shape
    n_d, Ld, _ = d.shape
    q_real, d_real = real_rows(q_lens, Lq), real_rows(d_lens, Ld)
    per_query_doc = Lq * Ld * q.element_size()
    q_step = max(1, min(n_q, chunk_bytes // per_query_doc))
    d_step = max(1, chunk_bytes // (q_step * per_query_doc))
    out = torch.empty(n_q, n_d, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                      device=q.device)
    for a0 in range(0, n_q, q_step):
        a1 = min(n_q, a0 + q_step)
        for b0 in range(0, n_d, d_step):
            b1 = min(n_d, b0 + d_step)
            scores = torch.einsum("ash,bth->abst", q[a0:a1], d[b0:b1])
            scores.masked_fill_(~d_real[None, b0:b1, None, :], float("-inf"))
            maxima = scores.amax(dim=-1).masked_fill_(~q_real[a0:a1, None, :], 0.0)
            out[a0:a1, b0:b1] = maxima.sum(dim=-1)
    return out


def peer_module(backend: str, device: torch.device):
    """(module, None) or (None, why not)."""
    module_name, pip_name, needs_gpu = PEERS[backend]
    if needs_gpu and device.type != "cuda":
        return None, f"{pip_name} needs a CUDA GPU"
    if not needs_gpu and device.type != "cpu":
        return None, f"{pip_name} runs on the CPU only"
    try:
        return importlib.import_module(module_name), None
    except Exception as err:  # ImportError, or a package that fails while importing
        return None, f"{pip_name} is not importable ({type(err).__name__}: {err}); pip install {pip_name}"


_PROBE_SCRIPT = """
import importlib, sys, torch
from bench import maxsim
backend, module_name, path = sys.argv[1:4]
q, d, q_lens, d_lens = torch.load(path)
maxsim.peer_fn(backend, importlib.import_module(module_name), q, d, q_lens, d_lens)()
"""


@functools.lru_cache(maxsize=None)
def _probe_peer(backend: str, q_len: int, d_len: int, dim: int, dtype: str, device: str) -> Optional[str]:
    """Runs the peer on one query of the longest length against two documents, in a child
    process: a peer that crashes (maxsim-cpu 0.1.0 dies with SIGSEGV at d=1024 for queries of 8
    or more tokens on this project's machines) must cost its own rows, not the whole run."""
    dt = getattr(torch, dtype)
    q = torch.randn(1, q_len, dim, dtype=dt, device=device)
    d = torch.randn(2, d_len, dim, dtype=dt, device=device)
    lens = (torch.tensor([q_len], device=device), torch.tensor([d_len, d_len], device=device))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inputs.pt")
        torch.save((q, d, *lens), path)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            run = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, backend, PEERS[backend][0], path], env=env,
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"{PEERS[backend][1]} did not finish one query in 300 s in a probe process"
    if run.returncode == 0:
        return None
    how = (f"was killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0
           else f"exited with {run.returncode}: {run.stderr.strip().splitlines()[-1:]}")
    return (f"{PEERS[backend][1]} {how} on one query (Lq={q_len}, Ld={d_len}, d={dim}, {dtype}) "
            f"in a probe process: not run in this one")


def peer_crash_reason(backend: str, q, d, q_lens, d_lens) -> Optional[str]:
    """None if the peer survives the benchmark's shape in a probe process, else why not."""
    return _probe_peer(backend, int(q_lens.max()), int(d_lens.max()), q.shape[-1],
                       str(q.dtype).replace("torch.", ""), str(q.device))


def peer_fn(backend: str, module, q, d, q_lens, d_lens) -> Callable:
    """A no-argument callable scoring all (query, document) pairs with a peer: (n_q, n_d)."""
    if backend == "maxsim_cpu":
        import numpy as np

        # The documents are the index: converted once, outside the timed call.
        d_list = d_lens.tolist()
        fixed = len(set(d_list)) == 1 and d_list[0] == d.shape[1]
        docs = d.numpy() if fixed else [d[b, :n].numpy() for b, n in enumerate(d_list)]
        queries = [q[a, :n].numpy() for a, n in enumerate(q_lens.tolist())]
        score = module.maxsim_scores if fixed else module.maxsim_scores_variable
        return lambda: torch.from_numpy(np.stack([score(query, docs) for query in queries]))
    if backend == "flash_maxsim":
        d32, q32 = d_lens.to(torch.int32), q_lens.to(torch.int32)
        return lambda: module.flash_maxsim_batched(q, d, doc_lengths=d32, query_lengths=q32)
    from rcar_fast.reference_heads import real_rows

    q_mask, d_mask = real_rows(q_lens, q.shape[1]), real_rows(d_lens, d.shape[1])
    return lambda: module.maxsim(q, d, q_mask, d_mask)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _row(ctx, op: str, problem: Problem, lens, mode: str, backend: str) -> dict:
    return dict(ctx.common, op=op, family="maxsim", variant="", mode=mode, backend=backend,
                detail="", sweep=problem.sweep, dtype=str(problem.dtype).replace("torch.", ""),
                n_img=problem.n_img, n_cap=problem.n_cap, pairs=problem.pairs,
                regions=problem.regions, mean_len=round(float(lens.float().mean()), 2),
                max_len=int(lens.max()), d=problem.d, sim_dim="", lengths=problem.lengths,
                status="", reason="")


def _skip_reason(ctx, backend: str, problem: Problem, skip_key) -> Optional[str]:
    from bench import suite

    late = suite.deadline_reason(ctx)
    if late:
        return late
    limit_reason = suite.baseline_limit_reason(ctx, backend, problem.pairs)
    if limit_reason:
        return limit_reason
    seconds = ctx.slow.get(skip_key)
    if seconds == suite.OUT_OF_MEMORY:
        return "skipped: ran out of memory at a smaller size"
    if seconds is not None and seconds > ctx.plan.skip_after_s:
        return (f"skipped: a call took {seconds:.1f} s at a smaller size, over the plan's "
                f"{ctx.plan.skip_after_s:.0f} s limit")
    return None


def _wanted(ctx, backend: str) -> bool:
    return not ctx.backends or backend in ctx.backends


def head_candidates(ctx, dtype) -> list:
    """[(backend, skip reason or None)]: dispatch's maxsim backends, then the naive baseline."""
    from bench import suite

    found = suite.candidate_backends(ctx, "maxsim", dtype, False)
    if _wanted(ctx, NAIVE):
        found.append((NAIVE, None))
    return found


def late_candidates(ctx, dtype) -> list:
    from bench import suite

    found = suite.candidate_backends(ctx, "maxsim", dtype, False)
    if _wanted(ctx, EINSUM):
        found.append((EINSUM, None))
    found += [(peer, None) for peer in PEERS if _wanted(ctx, peer)]
    return found


def _head_fn(ctx, op: str, backend: str) -> Callable:
    import rcar_fast

    settings = HEADS[op]
    if backend == NAIVE:
        chunk = ctx.plan.chunk_bytes
        return lambda img, cap, lens: naive_padded_head(img, cap, lens, chunk_bytes=chunk, **settings)
    return lambda img, cap, lens: rcar_fast.max_similarity(img, cap, lens, backend=backend, **settings)


def direct_settings(settings: dict) -> Optional[dict]:
    """The backend keywords of max_similarity settings (preset spelled out), or None where
    the wrapper does more than dispatch (normalize="unit": it normalises in torch)."""
    from rcar_fast.contract import CHAN_TAU, HEAD_PRESETS

    full = dict(direction="t2i", pool="mean", tau=CHAN_TAU, leaky=False, normalize="none",
                both_scale=0.5)
    full.update(HEAD_PRESETS.get(settings.get("preset"), {}))
    full.update({k: v for k, v in settings.items() if k != "preset"})
    if full.pop("normalize") != "none":
        return None
    return full


def direct_fn(backend: str, settings: dict, img_lens) -> Optional[Callable]:
    """fn(img, cap, lens) calling the backend's function itself: the kernels without the
    public wrapper's validation (its finite check reads every input element)."""
    from rcar_fast import dispatch

    kwargs = direct_settings(settings)
    impl = dispatch.implementation("maxsim", backend)
    if kwargs is None or impl is None:
        return None
    return lambda img, cap, lens: impl.fn(img, cap, lens, img_lens, **kwargs)


def _measure_row(ctx, row, run, flops, dtype, skip_key, reference_out):
    from bench import suite

    out = suite.measure_into(ctx, row, run, flops, dtype, skip_key)
    row["err_vs_reference"] = suite.relative_error(out, reference_out)
    return out


def run_head_case(ctx, case: Case) -> list:
    from bench import suite

    rows = []
    modes = [m for m in case.modes if not ctx.modes or m in ctx.modes]
    for problem in case.problems:
        lens = query_lengths(problem).to(ctx.device)
        inputs = None
        flops = tile_flops(problem, lens)
        for mode in modes:
            reference_out = None
            for backend, reason in head_candidates(ctx, problem.dtype):
                row = _row(ctx, case.op, problem, lens, mode, backend)
                skip_key = (case.op, mode, backend, row["dtype"], problem.sweep)
                reason = (reason or (None if backend == NAIVE else
                                     suite.forward_only_reason("maxsim", backend, mode != "forward"))
                          or _skip_reason(ctx, backend, problem, skip_key))
                if reason is None:
                    try:
                        if inputs is None:
                            inputs = make_inputs(problem, ctx.device)
                        img, cap, _, _ = inputs
                        run, reason = suite.mode_fn(mode, _head_fn(ctx, case.op, backend), img, cap,
                                                    lens, None)
                        if run is not None:
                            out = _measure_row(ctx, row, run, flops * MODE_FACTOR[mode], problem.dtype,
                                               skip_key, reference_out)
                            if backend == "reference":
                                reference_out = out
                                row["err_vs_reference"] = 0.0
                            del run, out
                    except Exception as err:  # one failing backend must not stop the run
                        suite.record_failure(ctx, row, err, skip_key, f"{case.op} {mode} {backend}")
                if not row["status"]:
                    row.update(status="skipped", reason=reason)
                rows.append(row)
                suite.log_row(ctx, row)
                if mode == "forward" and backend in OUR_BACKENDS and row["status"] == "ok":
                    rows.append(_direct_row(ctx, case.op, problem, lens, backend, inputs, flops,
                                            HEADS[case.op], reference_out))
    return rows


def _direct_row(ctx, op, problem, lens, backend, inputs, flops, settings, reference_out) -> dict:
    """The same forward call on the backend's function directly (variant "direct")."""
    from bench import suite

    row = _row(ctx, op, problem, lens, "forward", backend)
    row["variant"] = "direct"
    img, cap, _, img_lens = inputs
    fn = direct_fn(backend, settings, img_lens)
    skip_key = (op, "forward", backend, "direct", row["dtype"], problem.sweep, problem.n_cap)
    reason = "the wrapper normalises (normalize='unit'): no direct call" if fn is None else None
    reason = reason or _skip_reason(ctx, backend, problem, skip_key)
    if reason is None:
        try:
            def run():
                with torch.no_grad():
                    return fn(img, cap, lens)
            _measure_row(ctx, row, run, flops, problem.dtype, skip_key, reference_out)
            row["detail"] = "the backend's fn without the public wrapper (validation, dispatch)"
        except Exception as err:
            suite.record_failure(ctx, row, err, skip_key, f"{op} forward {backend} direct")
    if not row["status"]:
        row.update(status="skipped", reason=reason)
    suite.log_row(ctx, row)
    return row


def late_call(backend: str, q, d, q_lens, d_lens, *, chunk_bytes: int):
    """(callable, skip reason): the scores (n_q, n_d) of all pairs with one backend, the einsum
    (chunks of chunk_bytes) or a peer (probed in a child process first)."""
    import rcar_fast

    if backend == EINSUM:
        return (lambda: einsum_maxsim(q, d, q_lens, d_lens, chunk_bytes=chunk_bytes)), None
    if backend in PEERS:
        module, reason = peer_module(backend, q.device)
        if module is None:
            return None, reason
        reason = peer_crash_reason(backend, q, d, q_lens, d_lens)
        if reason is not None:
            return None, reason
        return peer_fn(backend, module, q, d, q_lens, d_lens), None
    return (lambda: rcar_fast.maxsim(q, d, q_lens, d_lens, backend=backend)), None


def run_late_case(ctx, case: Case) -> list:
    from bench import suite

    rows = []
    if ctx.modes and "forward" not in ctx.modes:
        return rows
    for problem in case.problems:
        q_lens = query_lengths(problem).to(ctx.device)
        inputs = None
        flops = tile_flops(problem, q_lens)
        reference_out = None
        for backend, reason in late_candidates(ctx, problem.dtype):
            row = _row(ctx, "maxsim", problem, q_lens, "forward", backend)
            skip_key = ("maxsim", backend, row["dtype"], problem.sweep, problem.n_cap)
            reason = reason or _skip_reason(ctx, backend, problem, skip_key)
            if reason is None:
                try:
                    if inputs is None:
                        inputs = make_inputs(problem, ctx.device)
                    d, q, _, d_lens = inputs
                    call, reason = late_call(backend, q, d, q_lens, d_lens, chunk_bytes=ctx.plan.chunk_bytes)
                    if call is not None:
                        def run(call=call):
                            with torch.no_grad():
                                return call()
                        out = _measure_row(ctx, row, run, flops, problem.dtype, skip_key, reference_out)
                        if backend == "reference":
                            reference_out = out
                            row["err_vs_reference"] = 0.0
                        del run, call, out
                except Exception as err:
                    suite.record_failure(ctx, row, err, skip_key, f"maxsim {problem.sweep} {backend}")
            if not row["status"]:
                row.update(status="skipped", reason=reason)
            rows.append(row)
            suite.log_row(ctx, row)
            if backend in OUR_BACKENDS and row["status"] == "ok":
                # maxsim(q, d) = the MrSw head on (d, q), transposed: the direct call returns
                # (n_d, n_q); compared after the transpose.
                direct = _direct_row(ctx, "maxsim", problem, q_lens, backend, inputs, flops,
                                     HEADS["head_mrsw"], None if reference_out is None
                                     else reference_out.transpose(0, 1))
                rows.append(direct)
    return rows


def gemm_row(ctx, when: str) -> dict:
    """An n x n fp32 matmul on the device: the GEMM rate the kernels are compared with."""
    from bench import suite

    n = ctx.plan.gemm_n
    row = dict(ctx.common, op="ceiling_matmul", family="ceiling", variant=when, mode="forward",
               backend="torch", detail=f"({n} x {n}) @ ({n} x {n}) float32, {when} of the run",
               sweep="gemm", dtype="float32", n_img=n, n_cap=n, pairs="", regions="",
               mean_len="", max_len="", d=n, sim_dim="", lengths="", status="", reason="")
    try:
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        a = torch.randn(n, n, generator=gen, device=ctx.device)
        b = torch.randn(n, n, generator=gen, device=ctx.device)
        flops = 2.0 * n ** 3
        suite.measure_into(ctx, row, lambda: a @ b, flops, torch.float32, ("ceiling", when))
    except Exception as err:
        row.update(status="error", reason=suite.error_text(err))
    ctx.log(f"  fp32 GEMM ({when}): {row.get('gflops_per_s') or float('nan'):.1f} GFLOP/s")
    return row


# ---------------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------------

_KEY = ("op", "mode", "dtype", "n_img", "n_cap", "d", "sweep")
PEER_BASELINES = (NAIVE, EINSUM) + tuple(PEERS)


def add_ratios(rows: list) -> None:
    """The suite's speedup columns (vs reference, reference_loop), `detail` ratios against the
    other baselines (baseline median / row median, same run and shape), and the GEMM ceiling
    columns (the higher of the run's two GEMM rates)."""
    from bench import suite

    measured = [r for r in rows if r["status"] == "ok" and r["family"] != "ceiling"]
    suite.add_speedups(measured)
    index = {tuple(r[k] for k in _KEY) + (r["backend"],): r["median_ms"] for r in measured
             if not r["variant"]}
    for r in measured:
        if r["variant"] == "direct":
            base = index.get(tuple(r[k] for k in _KEY) + ("reference",))
            r["speedup_vs_reference"] = None if base is None else base / r["median_ms"]
    for r in measured:
        ratios = []
        for baseline in PEER_BASELINES:
            base = index.get(tuple(r[k] for k in _KEY) + (baseline,))
            if base is not None and baseline != r["backend"]:
                ratios.append(f"x{base / r['median_ms']:.4g} vs {baseline}")
        if ratios:
            r["detail"] = "; ".join(filter(None, (r.get("detail"), "; ".join(ratios))))
    gemm = [r["gflops_per_s"] / 1e3 for r in rows
            if r["family"] == "ceiling" and r["status"] == "ok" and r.get("gflops_per_s")]
    if gemm:
        ceiling = max(gemm)
        for r in measured:
            if r.get("gflops_per_s"):
                r.update(ceiling_tflops=ceiling, pct_ceiling=100.0 * r["gflops_per_s"] / 1e3 / ceiling)


def _ratio(rows, row, baseline) -> Optional[float]:
    for r in rows:
        if (r["status"] == "ok" and r["backend"] == baseline and not r["variant"]
                and all(r[k] == row[k] for k in _KEY)):
            return r["median_ms"] / row["median_ms"]
    return None


def _output_mb(row) -> float:
    return 4.0 * row["n_img"] * row["n_cap"] / 2**20


def targets_section(rows: list) -> list:
    """The issue's targets against this run's rows: % of the GEMM rate, ratios vs maxsim-cpu
    and the einsum, memory beyond the output."""
    ok = [r for r in rows if r["status"] == "ok" and r["family"] != "ceiling"]
    gemm = [r for r in rows if r["family"] == "ceiling"]
    out = ["## MaxSim targets (issue 14)", ""]
    for g in gemm:
        rate = f"{g['gflops_per_s']:.1f} GFLOP/s" if g["status"] == "ok" else f"{g['status']}: {g['reason']}"
        out.append(f"- fp32 GEMM rate, {g['variant']} of the run: {rate} ({g['detail']})")
    ours = [r for r in ok if r["backend"] in OUR_BACKENDS]
    if not ours:
        out.append("- no fused backend (cpu / triton / cuda) ran: the table shows the vectorised "
                   "reference instead")
        ours = [r for r in ok if r["backend"] == "reference"]
    out += ["", "| op | mode | sweep | shape | L | d | backend | ms | % GEMM | vs reference "
            "| vs naive | vs einsum | vs maxsim-cpu | vs flash-maxsim | vs LIK | peak MB "
            "| peak - output MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
            "| --- | --- | --- |"]
    for r in ours:
        cells = [_ratio(rows, r, b) for b in ("reference", NAIVE, EINSUM) + tuple(PEERS)]
        peak = r.get("peak_mem_mb")
        # Forward rows only: a backward's outputs are the gradients, not the score matrix.
        extra = None if peak is None or r["mode"] != "forward" else peak - _output_mb(r)
        out.append(
            f"| {r['op']} | {r['mode']} | {r['sweep']} | {r['n_img']}x{r['n_cap']} | {r['mean_len']:.3g} "
            f"| {r['d']} | {r['backend']}{' ' + r['variant'] if r['variant'] else ''} | {r['median_ms']:.4g} | {_pct(r.get('pct_ceiling'))} | "
            + " | ".join("" if c is None else f"{c:.2f}" for c in cells)
            + f" | {'' if peak is None else f'{peak:.4g}'} | {'' if extra is None else f'{extra:.4g}'} |")
    out += ["", "Targets (CPU): the COCO-shaped MrSw head >= 80% of the GEMM rate, >= 3x "
            "maxsim-cpu and >= 20x the einsum on the same inputs, memory O(tile) beyond inputs "
            "and outputs (peak - output flat as pairs grow). Memory: resident-set high-water "
            "mark over one call (bench/measure.py); output = 4 n_img n_cap bytes.", ""]
    return out


def _pct(value) -> str:
    return "" if value is None else f"{value:.1f}%"


# ---------------------------------------------------------------------------------------------
# Entry point (python -m bench --maxsim)
# ---------------------------------------------------------------------------------------------

def run_plan(ctx) -> list:
    start = time.perf_counter()
    rows = [gemm_row(ctx, "start")]
    for case in ctx.plan.cases:
        ctx.log(f"{case.op}: modes {', '.join(case.modes)}")
        rows += run_late_case(ctx, case) if case.op == "maxsim" else run_head_case(ctx, case)
    rows.append(gemm_row(ctx, "end"))
    add_ratios(rows)
    ctx.log(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return rows


def _peer_threads(threads: int) -> dict:
    """maxsim-cpu (Rust, rayon) reads RAYON_NUM_THREADS when its pool starts: the same thread
    count as torch. Returns the previous values to restore."""
    before = {key: os.environ.get(key) for key in ("RAYON_NUM_THREADS",)}
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    return before


def _restore(environment: dict) -> None:
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def write_results(rows, facts, results_dir: str, suite_name: str, on_gpu: bool) -> list:
    """Appends the rows to <slug>.csv and the facts to <slug>.runs.jsonl; writes
    <slug>.maxsim.md (the suite's summary format plus the targets section)."""
    import rcar_fast

    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, facts["device_slug"])
    csv_path = report.append_csv(stem + ".csv", rows)
    report.append_run_facts(stem + ".runs.jsonl", facts)
    text = report.markdown(rows, facts, rcar_fast.backends(), suite_name, "not drawn for this suite",
                           on_gpu=on_gpu)
    head, _, tail = text.partition("## Headline")
    summary = head + "\n".join(targets_section(rows)) + "\n## Headline" + tail
    report.write_text(stem + ".maxsim.md", summary)
    print(f"results: {csv_path} ({len(rows)} rows), summary: {stem}.maxsim.md")
    return [csv_path, stem + ".runs.jsonl", stem + ".maxsim.md"]


def main(args, dev: torch.device, start: Callable, default_out: str) -> int:
    """Runs the maxsim plan (start: bench.__main__._start, which makes the run's columns)."""
    from bench import suite
    from rcar_fast import pairs  # noqa: F401  (registers the pair-list ops)

    if dev.type == "cpu":
        measure.configure_cpu_allocator()
    plan = select_plan(args, dev)
    environment = _peer_threads(torch.get_num_threads())
    try:
        common, facts, log = start(dev, plan.name, args.quiet)
        ctx = suite.RunContext(plan=plan, device=dev, common=common,
                               peak_name=common["device_name"] if dev.type == "cuda" else "",
                               backends=tuple(v.strip() for v in args.backends.split(",") if v.strip())
                               if args.backends else None,
                               modes=tuple(v.strip() for v in args.modes.split(",") if v.strip())
                               if args.modes else None, log=log)
        started = time.perf_counter()
        if args.max_minutes is not None:
            ctx.deadline = started + 60.0 * args.max_minutes
        rows = run_plan(ctx)
        facts.update(end=device_facts.snapshot(dev), seconds=round(time.perf_counter() - started, 1),
                     rows=len(rows), maxsim_threads=os.environ.get("RAYON_NUM_THREADS"),
                     peers={peer: _version(peer) for peer in PEERS})
        write_results(rows, facts, args.out or default_out, plan.name, dev.type == "cuda")
    finally:
        _restore(environment)
    return 0


def _version(peer: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(PEERS[peer][1])
    except metadata.PackageNotFoundError:
        return "not installed"


__all__ = ["HEADS", "PEERS", "tiny_plan", "quick_plan", "full_plan", "naive_padded_head",
           "einsum_maxsim", "late_call", "run_plan", "main"]
