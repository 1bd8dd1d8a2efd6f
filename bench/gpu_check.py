"""The GPU check (`python -m bench --gpu-check [--part P]`): a few minutes on one GPU that
answer "how fast is rcar_fast at the COCO 5K evaluation and a training batch, against the
hardware and the public algorithm?".

Parts (--part; default all, in this order; scripts/gpu_check.sh runs each as its own step
under its own timeout): "maxsim" (issue 14), "rcar-backward" and "rcar-forward" (issue 15) are
bench/gpu_parts.py's; "coco" is this module's:

1. Hardware ceilings measured on this device: an 8192^3 bf16 matmul's TFLOP/s and a device
   copy's GB/s (read + write bytes over time) (dry run: a small fp32 matmul and copy on the CPU).
2. Every head family of the registry (rcar_fast.scorers.SCORERS; PUBLISHED_OPS gives the
   published settings of those it knows, a new family is measured at its defaults) at the
   COCO 5K shape, 5,000 images x 25,000 captions, R = 36, d = 1024, caption lengths drawn like
   COCO's (cases.coco_lengths: 8 + Geometric(2/9) clipped at 50, mean ~11.5), through
   `rcar_fast.all_pairs` (default blocks, matrix returned on the host as a user gets it), in
   bf16 and fp32 on triton and cuda. Inputs are generated on the device in the dtype. SCAN:
   t2i and i2t (smooth 9 / 4, mean aggregation, clipped_l2norm); the S-only heads: the maxsim
   part's.
3. A head over SAMPLED_OVER_TILE_GEMMS (RCAR coop_rcar(2), sim_dim 256, t2i) is measured
   at 1000 x 5000 (a slice of the same inputs) and extrapolated per pair to 5K x 25K: the
   `extrapolated` column says so and gives the measured time.
4. Baselines, measured in the same run at a small size (slices of the same inputs) and
   extrapolated per pair to 5K x 25K: the vectorised reference ("reference") and the public
   code's per-caption loop ("reference_loop"). speedup_vs_* columns hold the ratios.
   err_vs_reference of a fast row is its error on the reference's sample.
   Each fast backend also gets a "direct" row (variant): one call of the op on the same inputs,
   scores left on the device: the kernels' time without all_pairs' host copy of the matrix.
5. A training step of SCAN t2i's hardest-negative loss at B = 128, full B x B and sparse, on
   reference / triton / cuda (bench.suite.run_loss_case); RCAR's is the rcar-backward part's.

Every row carries time, model TFLOP/s (bench/flops.py), % of the measured matmul ceiling
(pct_ceiling), the bf16 floor (floor_ms = model FLOPs at the bf16 dense peak of the device's
datasheet, bench/device.py; pct_floor = floor_ms / median_ms; without a datasheet entry, the
measured ceiling stands in: floor_tflops says which rate was used), peak memory, and the
autotune mode (RCAR_FAST_AUTOTUNE; "quick" unless --autotune full). A case that raises is an
"error" row with the reason and the run goes on.

--dry-run runs the same steps at tiny sizes on the CPU (triton in its interpreter where it
takes the dtype; cuda rows skipped with the reason), for CI.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from bench import cases, measure, suite
from bench.device import peak_tflops

FAST_BACKENDS = ("triton", "cuda")
BASELINES = ("reference", "reference_loop")
LENGTHS_NOTE = "coco: 8 + Geometric(p=2/9) words, clipped at 50 (mean ~11.5, median 10)"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one GPU check (full or dry run)."""
    suite: str
    n_img: int
    n_cap: int
    regions: int
    d: int
    sim_dim: int
    rcar_sample: tuple            # (n_img, n_cap) the fast RCAR backends are measured at
    samples: dict                 # (family, baseline) -> (n_img, n_cap) measured at
    loss_batch: int
    matmul_n: int
    matmul_dtype: torch.dtype
    copy_bytes: int
    budget_s: float               # per-row timing budget (repeats adapt to it)
    warmup_only_over_s: float     # a warm-up slower than this is the measurement
    dtypes: tuple = (torch.bfloat16, torch.float32)
    single_call_over_s: float = 2.0   # a call slower than this is measured once after warm-up
    dry_run: bool = False


# The reference baselines measured on a sample of the pairs: (family, baseline), the keys of
# Sizes.samples in the order sampled() takes their sizes.
SAMPLED_BASELINES = (("scan", "reference"), ("scan", "reference_loop"), ("rcar", "reference"),
                     ("rcar", "reference_loop"))


def sampled(*sizes: tuple) -> dict:
    """Sizes.samples: the (n_img, n_cap) of each of SAMPLED_BASELINES, in that order."""
    if len(sizes) != len(SAMPLED_BASELINES):
        raise ValueError(f"one sample size per baseline of {SAMPLED_BASELINES}, got {len(sizes)}")
    return dict(zip(SAMPLED_BASELINES, sizes))


def full_sizes() -> Sizes:
    return Sizes(
        suite="gpu-check", n_img=5000, n_cap=25000, regions=36, d=1024, sim_dim=256,
        rcar_sample=(1000, 5000),
        # The loop runs caption by caption over all images: few captions, many images.
        samples=sampled((250, 1000), (500, 50), (50, 250), (50, 20)),
        loss_batch=128, matmul_n=8192, matmul_dtype=torch.bfloat16, copy_bytes=2**30, budget_s=0.5,
        # Above the compile + autotune time of a first call (quick autotune: ~10-30 s), so a
        # row is timed from its warm-up only when even one more call would not fit the budget.
        warmup_only_over_s=45.0)


def dry_sizes() -> Sizes:
    return Sizes(
        suite="gpu-check-dry", n_img=4, n_cap=10, regions=6, d=32, sim_dim=16,
        rcar_sample=(2, 5),
        samples=sampled((2, 5), (2, 4), (2, 4), (2, 3)),
        # Every row timed from its one warm-up call: the interpreter's seconds mean nothing.
        loss_batch=4, matmul_n=256, matmul_dtype=torch.float32, copy_bytes=2**23, budget_s=0.0,
        warmup_only_over_s=0.0, dry_run=True)


@dataclasses.dataclass
class Check:
    ctx: suite.RunContext
    sizes: Sizes
    extra: dict                   # columns every row of this run gets (autotune mode)
    matmul_tflops: Optional[float] = None
    copy_gbs: Optional[float] = None
    to_host_ms: Optional[float] = None
    rows: list = dataclasses.field(default_factory=list)
    reference_samples: dict = dataclasses.field(default_factory=dict)  # (op, dtype) -> (inputs, out)
    # Called with each row emit() finishes (bench/__main__: appends it to the CSV at once, so
    # that a part cut by its timeout keeps what it measured); rows it has taken are `written`.
    sink: Optional[Callable] = None
    written: set = dataclasses.field(default_factory=set)
    headline: str = ""            # the part's one-line result, printed last

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def emit(self, row: dict) -> None:
        """A finished row (its ratios already set): ceiling columns added, kept, and handed
        to the sink."""
        row.update(self.extra)
        add_ceiling_columns(self, [row])
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
            self.written.add(id(row))

    def out_of_time(self) -> Optional[str]:
        return suite.deadline_reason(self.ctx)


def plan_for(sizes: Sizes) -> cases.Plan:
    """The RunContext's plan: timing budget and repeats of the GPU check's rows."""
    return cases.Plan(name=sizes.suite, op_cases=(), loss_cases=(), budget_s=sizes.budget_s,
                      min_repeats=1, max_repeats=5, skip_after_s=float("inf"),
                      compile="the GPU check does not run the torch.compile baseline",
                      single_call_over_s=sizes.single_call_over_s,
                      warmup_only_over_s=sizes.warmup_only_over_s)


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def _ceiling_row(check: Check, op: str, dtype, detail: str) -> dict:
    return dict(check.ctx.common, **check.extra, op=op, family="ceiling", variant="",
                mode="forward", backend="torch", detail=detail, sweep="ceiling",
                dtype=str(dtype).replace("torch.", ""), status="", reason="")


def measure_ceilings(check: Check) -> list:
    """Rows for the matmul and copy ceilings (sets check.matmul_tflops / copy_gbs), and the
    device-to-host copy of one result matrix: all_pairs returns the matrix on the host, so
    that copy is part of every all_pairs row's time (this row says how much)."""
    sizes, dev = check.sizes, check.device
    n, dtype = sizes.matmul_n, sizes.matmul_dtype
    result_bytes = 4 * sizes.n_img * sizes.n_cap
    steps = (
        (_ceiling_row(check, "ceiling_matmul", dtype, f"({n} x {n}) @ ({n} x {n})"),
         lambda: _matmul_call(n, dtype, dev)),
        (_ceiling_row(check, "ceiling_copy", torch.uint8,
                      f"dst.copy_(src), {sizes.copy_bytes / 2**20:.0f} MiB, read + write bytes"),
         lambda: _copy_call(sizes.copy_bytes, dev)),
        (_ceiling_row(check, "result_to_host", torch.float32,
                      f"({sizes.n_img} x {sizes.n_cap}) float32 .cpu(), {result_bytes / 2**20:.0f} MiB"),
         lambda: _to_host_call(sizes.n_img, sizes.n_cap, dev)),
    )
    rows = []
    for row, setup in steps:
        rows.append(row)
        reason = check.out_of_time()
        if reason is None and row["op"] == "result_to_host" and dev.type != "cuda":
            reason = "no device-to-host copy on a CPU"
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        try:
            run, work = setup()
            timing, memory = measure.measure_call(run, dev, budget_s=max(sizes.budget_s, 0.05),
                                                  min_repeats=3, max_repeats=50)
            del run
            row.update(status="ok", median_ms=timing.median_s * 1e3, min_ms=timing.min_s * 1e3,
                       repeats=timing.repeats, first_call_ms=timing.first_s * 1e3,
                       peak_mem_mb=None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
                       mem_method=memory.method)
            if row["op"] == "ceiling_matmul":
                row.update(flops=work, gflops_per_s=work / timing.median_s / 1e9)
                check.matmul_tflops = work / timing.median_s / 1e12
            else:
                row.update(gbytes_per_s=work / timing.median_s / 1e9)
                if row["op"] == "ceiling_copy":
                    check.copy_gbs = work / timing.median_s / 1e9
                else:
                    check.to_host_ms = timing.median_s * 1e3
        except Exception as err:  # a ceiling that fails leaves the % columns empty, no more
            row.update(status="error", reason=suite.error_text(err))
        check.ctx.log(f"  {row['op']:38s} {row['detail']:45s} {row['status']} "
                      f"{row.get('median_ms', float('nan')):.4g} ms {row.get('reason', '')}")
    return rows


def _to_host_call(n_img: int, n_cap: int, dev):
    src = torch.zeros(n_img, n_cap, dtype=torch.float32, device=dev)
    return (lambda: src.cpu()), 4.0 * n_img * n_cap


def _matmul_call(n: int, dtype, dev):
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=dev, dtype=dtype)
    return (lambda: a @ b), 2.0 * n ** 3


def _copy_call(nbytes: int, dev):
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2.0 * nbytes


# ---------------------------------------------------------------------------------------------
# Similarity rows through all_pairs
# ---------------------------------------------------------------------------------------------

def _target_shape(sizes: Sizes, dtype) -> cases.Shape:
    return cases.Shape(sizes.n_img, sizes.n_cap, sizes.regions, 12, sizes.d, dtype, "coco5k", "coco")


def _pairs_call(op: cases.OpSpec, backend: str, head, img, cap, lens, dev) -> Callable:
    from rcar_fast.evaluation import all_pairs, rcar_fn, scan_fn

    fn = scan_fn(backend, **op.scan_kwargs()) if op.family == "scan" else rcar_fn(head, backend)
    return lambda: all_pairs(img, cap, lens, fn, device=dev, progress=False)


def _slice(inputs, n_img: int, n_cap: int):
    img, cap, lens = inputs
    lens = lens[:n_cap]
    return img[:n_img], cap[:n_cap, :int(lens.max())], lens


def _backend_reason(check: Check, op: cases.OpSpec, backend: str, dtype) -> Optional[str]:
    from rcar_fast import dispatch

    return (dispatch.environment_reason(backend, check.device.type)
            or dispatch.rejection(op.dispatch_op, backend, check.device, dtype))


def similarity_row(check: Check, op: cases.OpSpec, backend: str, inputs, head,
                   sample: tuple, direct: bool = False) -> dict:
    """One row at the target shape: measured at `sample` (n_img, n_cap) through all_pairs
    (direct: one call of the op on the whole sample, scores left on the device: variant
    "direct"), extrapolated per pair when the sample is smaller."""
    sizes, dev = check.sizes, check.device
    dtype = inputs[0].dtype
    shape = _target_shape(sizes, dtype)
    full_lens = inputs[2]
    row = suite.base_row(check.ctx, op, shape, full_lens, "forward", backend,
                         "direct" if direct else "")
    row.update(check.extra)
    reason = check.out_of_time() or _backend_reason(check, op, backend, dtype)
    if reason:
        row.update(status="skipped", reason=reason)
        return row
    sample_inputs = _slice(inputs, *sample)
    sample_shape = dataclasses.replace(shape, n_img=sample[0], n_cap=sample[1])
    skip_key = (op.name, row["variant"], backend, row["dtype"], "gpu-check")
    try:
        if direct:
            img, cap, lens = sample_inputs
            run, _ = suite.mode_fn("forward", suite.similarity_fn(check.ctx, op, backend, head),
                                   img, cap, lens.to(dev), head)
            row["detail"] = "one call of the op on the whole inputs; scores stay on the device"
        else:
            run = _pairs_call(op, backend, head, *sample_inputs, dev)
            row["detail"] = "rcar_fast.all_pairs, default blocks; matrix returned on the host"
        out = suite.measure_into(check.ctx, row, run,
                                 suite.forward_flops(op, sample_shape, sample_inputs[2]), dtype, skip_key)
        del run
        if not direct:   # the all_pairs row of the same backend checks its numbers
            try:
                _check_against_reference(check, op, backend, head, row, sample_inputs, out)
            except Exception as err:  # the timing stands; the check's failure is said
                row["detail"] += f"; error check failed: {suite.error_text(err)}"
        del out
        if sample_shape.pairs != shape.pairs:
            _extrapolate(row, shape.pairs / sample_shape.pairs,
                         suite.forward_flops(op, shape, full_lens), sample)
    except Exception as err:  # one failing case must not stop the check
        suite.record_failure(check.ctx, row, err, skip_key, f"{op.name} {row['dtype']} {backend}")
    return row


def _check_against_reference(check, op, backend, head, row, sample_inputs, out) -> None:
    """err_vs_reference: the reference's output on its sample is kept; a backend measured on a
    smaller sample (the loop) is compared with the reference run on that sample, one measured
    on a larger sample (the fast backends) is run again on the reference's sample."""
    key = (op.name, row["dtype"])
    if backend == "reference":
        check.reference_samples[key] = (sample_inputs, out)
        row["err_vs_reference"] = 0.0
        return
    if key not in check.reference_samples:
        return
    ref_inputs, ref_out = check.reference_samples[key]
    if sample_inputs[0].shape[0] * sample_inputs[2].shape[0] <= ref_inputs[0].shape[0] * ref_inputs[2].shape[0]:
        ref_out = _pairs_call(op, "reference", head, *sample_inputs, check.device)()
        got = out
    else:
        got = _pairs_call(op, backend, head, *ref_inputs, check.device)()
    row["err_vs_reference"] = suite.relative_error(got, ref_out)


def _extrapolate(row: dict, factor: float, target_flops: float, sample: tuple) -> None:
    measured_ms = row["median_ms"]
    row.update(median_ms=measured_ms * factor, min_ms=row["min_ms"] * factor, flops=target_flops,
               extrapolated=(f"x{factor:.4g} per pair from {sample[0]}x{sample[1]} (measured "
                             f"{measured_ms:.4g} ms; peak memory and first call at that size)"))
    seconds = row["median_ms"] / 1e3
    row["gflops_per_s"] = target_flops / seconds / 1e9
    if row.get("peak_tflops"):
        row["pct_peak"] = 100.0 * target_flops / seconds / 1e12 / row["peak_tflops"]


def add_ceiling_columns(check: Check, rows: list) -> None:
    """pct_ceiling (of the measured matmul), floor_ms / pct_floor (bf16 datasheet peak, or the
    measured ceiling where the device has no datasheet entry)."""
    floor = peak_tflops(check.ctx.peak_name, torch.bfloat16) if check.ctx.peak_name else None
    floor = floor or check.matmul_tflops
    for row in rows:
        if row.get("status") != "ok" or not row.get("flops") or row.get("family") == "ceiling":
            continue
        tflops = row["flops"] / (row["median_ms"] / 1e3) / 1e12
        if check.matmul_tflops:
            row.update(ceiling_tflops=check.matmul_tflops,
                       pct_ceiling=100.0 * tflops / check.matmul_tflops)
        if floor:
            floor_ms = row["flops"] / (floor * 1e12) * 1e3
            row.update(floor_tflops=floor, floor_ms=floor_ms,
                       pct_floor=100.0 * floor_ms / row["median_ms"])


def _op_rows(check: Check, op: cases.OpSpec, inputs, head) -> list:
    """Baselines first (the fast rows are checked against the reference's output), then the
    fast backends."""
    sizes = check.sizes
    rows = []
    for backend in BASELINES:
        sample = sizes.samples.get((op.family, backend), sizes.samples[("rcar", backend)])
        rows.append(similarity_row(check, op, backend, inputs, head, sample))
        suite.log_row(check.ctx, rows[-1])
    sample = _fast_sample(check, op, inputs, head)
    for direct in (False, True):
        for backend in FAST_BACKENDS:
            rows.append(similarity_row(check, op, backend, inputs, head, sample, direct))
            suite.log_row(check.ctx, rows[-1])
    return rows


# A head whose model FLOPs per pair exceed this many region-word tile GEMMs (2 R L d: SCAN ~1-2,
# the S-only heads 1, RCAR coop_rcar(2) ~40 at the COCO shape) is measured by the fast backends
# on sizes.rcar_sample and extrapolated.
SAMPLED_OVER_TILE_GEMMS = 8.0


def _fast_sample(check: Check, op: cases.OpSpec, inputs, head) -> tuple:
    sizes = check.sizes
    shape = _target_shape(sizes, inputs[0].dtype)
    lens = inputs[2]
    per_pair = suite.forward_flops(op, shape, lens, head) / shape.pairs
    tile_gemm = 2.0 * sizes.regions * float(lens.float().mean()) * sizes.d
    return sizes.rcar_sample if per_pair > SAMPLED_OVER_TILE_GEMMS * tile_gemm else (sizes.n_img, sizes.n_cap)


# The settings of the COCO 5K all_pairs rows per head family of the registry (rcar_fast.scorers
# SCORERS): the published ones where known; a family not listed here is measured at its
# defaults, so a new head is covered without editing this file; () where another part of the
# check measures the family (maxsim: bench/gpu_parts.py, --part maxsim).
PUBLISHED_OPS = {
    "scan": lambda sizes: (cases.scan_op("t2i"), cases.scan_op("i2t")),
    "rcar": lambda sizes: (cases.rcar_op("coop_rcar", 2, "t2i", sizes.sim_dim),),
    "maxsim": lambda sizes: (),
}


def coco_ops(sizes: Sizes) -> list:
    """The OpSpecs of the COCO 5K rows, one family of rcar_fast.scorers.SCORERS after another."""
    from rcar_fast import scorers

    ops = []
    for scorer in scorers.SCORERS:
        make = PUBLISHED_OPS.get(scorer.name)
        ops.extend(make(sizes) if make is not None else (cases.OpSpec(f"{scorer.name}_default", scorer.name),))
    return ops


def _rcar_head(check: Check, op: cases.OpSpec, dtype):
    shape = cases.Shape(1, 1, check.sizes.regions, 12, check.sizes.d, dtype)
    return suite.make_head(op, shape, check.device)


def _inputs(check: Check, dtype):
    sizes = check.sizes
    lens = cases.caption_lengths(sizes.n_cap, 12, "coco")
    img, cap = cases.device_inputs(sizes.n_img, sizes.regions, lens, sizes.d, dtype, check.device)
    return img, cap, lens


def _loss_rows(check: Check, op: cases.OpSpec, dtype) -> list:
    sizes = check.sizes
    shape = cases.Shape(sizes.loss_batch, sizes.loss_batch, sizes.regions, 12, sizes.d, dtype,
                        "batch", "coco")
    keep = check.ctx.backends
    check.ctx.backends = ("reference",) + FAST_BACKENDS
    try:
        rows = suite.run_loss_case(check.ctx, cases.LossCase(op, (shape,)))
    finally:
        check.ctx.backends = keep
    for row in rows:
        row.update(check.extra)
    return rows


def _step_failed(check: Check, what: str, dtype, err: BaseException) -> dict:
    """The row of a step that failed outside any one measurement (making inputs, a head)."""
    check.ctx.log(f"  error: {what}: {suite.error_text(err)}")
    if suite.is_out_of_memory(err) and check.device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(check.ctx.common, **check.extra, op=what, family="step", variant="",
                mode="forward", backend="", detail="", sweep="coco5k",
                dtype=str(dtype).replace("torch.", ""), n_img=check.sizes.n_img,
                n_cap=check.sizes.n_cap, status="error", reason=suite.error_text(err))


def _dtype_steps(check: Check, dtype, ops) -> None:
    """The COCO 5K rows of every op in one dtype, on inputs made once for them."""
    log, sizes = check.ctx.log, check.sizes
    try:
        inputs = _inputs(check, dtype)
    except Exception as err:
        check.rows.append(_step_failed(check, f"inputs_{str(dtype).replace('torch.', '')}", dtype, err))
        return
    try:
        for op in ops:
            try:
                head = _rcar_head(check, op, dtype)
            except Exception as err:
                check.rows.append(_step_failed(check, f"head_{op.name}", dtype, err))
                continue
            log(f"{op.name} {dtype}: all_pairs at {sizes.n_img} x {sizes.n_cap} (slow heads on a sample, "
                "extrapolated)")
            check.rows.extend(_op_rows(check, op, inputs, head))
            del head
    finally:
        del inputs
        check.reference_samples.clear()
        if check.device.type == "cuda":
            torch.cuda.empty_cache()


def _loss_step(check: Check, op: cases.OpSpec) -> None:
    check.ctx.log(f"training step: hardest-negative loss, B = {check.sizes.loss_batch}, {op.name} fp32")
    try:
        check.rows.extend(_loss_rows(check, op, torch.float32))
    except Exception as err:
        check.rows.append(_step_failed(check, f"loss_{op.name}", torch.float32, err))


PARTS = ("maxsim", "rcar-backward", "coco", "rcar-forward")


def run_check(check: Check, part: str = "all", sim_dim: int = 64) -> list:
    """The part(s) in priority order (all: maxsim, rcar-backward at sim_dim, coco,
    rcar-forward at the recipe's sim_dim 256), rows
    appended to check.rows as they are measured (an interrupted run keeps them); returns
    them (finish_rows adds speedups and ceilings)."""
    from bench import gpu_parts

    if part in ("all", "maxsim"):
        gpu_parts.run_maxsim(check)
    if part in ("all", "rcar-backward"):
        gpu_parts.run_rcar_backward(check, sim_dim)
    if part in ("all", "coco"):
        run_coco(check)
    if part in ("all", "rcar-forward"):
        gpu_parts.run_rcar_forward(check)
    return finish_rows(check)


def run_coco(check: Check) -> None:
    """Ceilings, the COCO 5K rows of every head family (coco_ops) in each dtype, and SCAN's
    training step. (RCAR's training step is the rcar-backward part's: its fused backward is
    compiled there under a sim_dim-specific timeout.)"""
    check.rows.extend(measure_ceilings(check))
    check.ctx.log(f"ceilings: matmul {check.matmul_tflops or float('nan'):.4g} TFLOP/s, "
                  f"copy {check.copy_gbs or float('nan'):.4g} GB/s")
    ops = coco_ops(check.sizes)
    for k, dtype in enumerate(check.sizes.dtypes):
        _dtype_steps(check, dtype, ops)
        if k == 0:
            _loss_step(check, cases.scan_op("t2i"))
    check.headline = coco_headline(check.rows, [str(d).replace("torch.", "") for d in check.sizes.dtypes])


def coco_headline(rows: list, dtypes: list) -> str:
    """The fast all_pairs rows of the first dtype (in the check's order) that has any."""
    for dtype in dtypes:
        fast = [f"{r['op']} {r['backend']} {r['median_ms']:.4g} ms{'*' if r.get('extrapolated') else ''}"
                for r in rows if r.get("sweep") == "coco5k" and r.get("backend") in FAST_BACKENDS
                and not r.get("variant") and r.get("status") == "ok" and r.get("dtype") == dtype]
        if fast:
            return f"coco {dtype} all_pairs: " + "; ".join(fast)
    return "coco all_pairs: no fast row measured"


def finish_rows(check: Check) -> list:
    """Speedups and ceiling columns of the rows measured so far (also after an interruption);
    rows already emitted (written as measured) keep the columns they were written with."""
    rows = [r for r in check.rows if id(r) not in check.written]
    suite.add_speedups([r for r in rows if r["family"] not in ("ceiling", "step")])
    _direct_speedups(rows)
    add_ceiling_columns(check, rows)
    return check.rows


def _direct_speedups(rows: list) -> None:
    """speedup_vs_<baseline> of the "direct" rows, against the baselines' all_pairs rows."""
    base = {(r["op"], r["dtype"], r["backend"]): r["median_ms"] for r in rows
            if r["status"] == "ok" and r["sweep"] == "coco5k" and not r["variant"]}
    for r in rows:
        if r["status"] == "ok" and r.get("variant") == "direct":
            for baseline in BASELINES:
                ms = base.get((r["op"], r["dtype"], baseline))
                r[f"speedup_vs_{baseline}"] = None if ms is None else ms / r["median_ms"]


def autotune_mode() -> str:
    return os.environ.get("RCAR_FAST_AUTOTUNE", "") or "full"


def ceiling_facts(check: Check) -> dict:
    """The ceilings for the run's facts (runs.jsonl) and the summary."""
    sizes = check.sizes
    return {"matmul_tflops": check.matmul_tflops,
            "matmul": f"{sizes.matmul_n}^3 {str(sizes.matmul_dtype).replace('torch.', '')}",
            "copy_gbs": check.copy_gbs, "copy_bytes": sizes.copy_bytes,
            "result_to_host_ms": check.to_host_ms}


def new_check(ctx: suite.RunContext, sizes: Sizes) -> Check:
    return Check(ctx=ctx, sizes=sizes, extra=dict(autotune=autotune_mode()))

