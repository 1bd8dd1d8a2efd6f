"""The GPU check's issue parts: `python -m bench --gpu-check --part maxsim | rcar-backward`.

Each part writes its rows into the suite's CSV as they are measured (Check.emit: a part cut
by scripts/gpu_check.sh's timeout keeps every row it finished), and its last log line is a
headline the check's summary.tsv quotes.

maxsim (issue 14), bf16, in this order (cheap and telling first):
1. The ceilings of the run (gpu_check.measure_ceilings: the 8192^3 bf16 matmul is the GEMM
   floor: model FLOPs / that rate; pct_ceiling = floor / time).
2. COCO 5K MrSw (ALADIN / ColBERT / DVSA: max over regions, sum over words; R = 36, COCO
   caption lengths, d = 1024; 5,000 x 25,000 pairs, ~106 TFLOP of tile work over the real
   words) through the public API on every fast backend of op "maxsim" (triton, cuda): variant
   "direct" = one `rcar_fast.max_similarity` call on all pairs, scores left on the device;
   variant "" = `rcar_fast.all_pairs(..., "colbert")`, default blocks, matrix on the host.
   Each is first measured on a 1/25 subset (1,000 x 5,000); the whole shape is measured when
   the subset predicts a call under Sizes.full_call_max_s, else the row is the subset's time
   extrapolated per pair (the `extrapolated` column says so). Baselines on slices, extrapolated:
   the vectorised reference (also the error check of every fast row, on its slice) and
   `naive_padded` (bench.maxsim: the padded GEMM + mask + amax a user writes in torch).
3. The ColBERT shape (Lq = 32, Ld = 300, d = 128, 1 query x 10,000 documents, then 1,000
   queries) through `rcar_fast.maxsim` on triton and cuda against the reference and
   `einsum_pylate` (PyLate's (A, B, Lq, Ld) einsum, chunked) measured in the same run;
   flash-maxsim and late-interaction-kernels rows, "skipped: ... not importable" where absent.

rcar-backward (issue 15), --sim-dim S (the recipe's 256 first: its three launches compile in
~1-2 min offline; 64 last, when time is left): coop_rcar(2) t2i, bf16, B = 128
(all B x B pairs of a training batch, R = 36, COCO caption lengths, d = 1024), eval-mode head
(no dropout: both backends compute the same function): "backward" (the gradient of all B x B
scores w.r.t. img, cap and every head weight, from a kept forward: the reference replays its
autograd graph, triton runs kernels/rcar_backward.py) and "train_step" (forward + backward:
its peak memory holds the reference's saved activations), reference first, then triton, then
the sparse and full hardest-negative loss (bench.suite.run_loss_case). Peak memory:
torch.cuda.max_memory_allocated over the call.

rcar-forward (issue 15's GPU targets: COCO 5K coop_rcar(2) t2i <= 8 s, i2t <= 20 s, bf16): the
Triton RCAR forward kernel (kernels/rcar.py rcar_forward, one launch, scores on the device) at
the COCO 5K shape, sim_dim 256, measured on a 1000 x 5000 sample and extrapolated per pair, once
per tile of its GPU tile space (GPU_TILES: work items of 128 rows at SW 128 and 64, and of 64
rows), t2i and i2t, default tiles first; err_vs_reference is that launch's scores on a slice of
the sample against the float64 reference. The rows decide GPU_TILES' default order.

--dry-run: the same parts at tiny sizes on the CPU (triton in its interpreter, fp32: the
interpreter refuses bf16 dots; cuda and the GPU peers skipped with their reasons).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from bench import cases, gpu_check, suite
from bench import maxsim as maxsim_bench

MRSW = dict(direction="t2i", pool="sum")   # = preset "colbert" / "dvsa" (normalize "none")
MRSW_PRESET = "colbert"
LATE_PEERS = ("flash_maxsim", "late_interaction_kernels")


@dataclasses.dataclass(frozen=True)
class PartSizes:
    mrsw: tuple                  # (n_img, n_cap) target
    mrsw_subset: tuple           # measured first
    mrsw_reference: tuple        # the reference's slice (and every fast row's error check)
    mrsw_naive: tuple            # naive_padded's slice
    colbert_docs: int
    colbert_queries: tuple       # query counts, in order
    colbert: tuple               # (Ld, Lq, d)
    regions: int
    d: int
    dtype: torch.dtype
    full_call_max_s: float       # the whole MrSw shape is measured when predicted under this
    chunk_bytes: int             # the torch baselines' chunk
    batch: int                   # rcar-backward: B
    rcar_forward: tuple = (1000, 5000)   # rcar-forward: the sample measured (the target: mrsw)
    rcar_reference: tuple = (8, 40)      # rcar-forward: the float64 reference's slice
    lengths: tuple = (12, "coco")   # caption (mean length, distribution): bench.cases
    sim_dim_divisor: int = 1     # the dry run scales --sim-dim down


def part_sizes(dry_run: bool) -> PartSizes:
    if dry_run:
        # Triton's interpreter runs a program per pair and word: few of each.
        return PartSizes(mrsw=(4, 12), mrsw_subset=(2, 6), mrsw_reference=(2, 4), mrsw_naive=(2, 6),
                         colbert_docs=8, colbert_queries=(1,), colbert=(7, 3, 16), regions=4,
                         d=16, dtype=torch.float32, full_call_max_s=60.0, chunk_bytes=2**12,
                         batch=2, lengths=(3, "uniform"), sim_dim_divisor=16,
                         rcar_forward=(2, 6), rcar_reference=(2, 3))
    return PartSizes(mrsw=(5000, 25000), mrsw_subset=(1000, 5000), mrsw_reference=(200, 1000),
                     mrsw_naive=(1000, 5000), colbert_docs=10000, colbert_queries=(1, 1000),
                     colbert=(300, 32, 128), regions=36, d=1024, dtype=torch.bfloat16,
                     full_call_max_s=3.0, chunk_bytes=2 * 2**30, batch=128)


# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------

def _fast_backends() -> tuple:
    """The GPU backends of op "maxsim" that dispatch lists (triton, cuda as registered)."""
    from rcar_fast import dispatch

    return tuple(b for b in gpu_check.FAST_BACKENDS if dispatch.implementation("maxsim", b) is not None)


def _skip_reason(check, backend: str, op: str, dtype) -> Optional[str]:
    from rcar_fast import dispatch

    return (check.out_of_time() or dispatch.environment_reason(backend, check.device.type)
            or dispatch.rejection(op, backend, check.device, dtype))


def _measure(check, row, run: Callable, flops: float, dtype, key) -> Optional[object]:
    """measure_into, an error recorded in the row instead of raised; returns the output."""
    try:
        return suite.measure_into(check.ctx, row, run, flops, dtype, key)
    except Exception as err:  # one failing backend must not stop the part
        suite.record_failure(check.ctx, row, err, key, f"{row['op']} {row['backend']}")
        return None


def _speedups(row: dict, baselines: dict) -> None:
    """speedup_vs_reference and `detail` ratios against the other baselines of the part
    (baseline name -> its median ms at the same target shape)."""
    if row.get("status") != "ok":
        return
    ratios = []
    for name, ms in baselines.items():
        if ms is None or name == row["backend"]:
            continue
        if name == "reference":
            row["speedup_vs_reference"] = ms / row["median_ms"]
        else:
            ratios.append(f"x{ms / row['median_ms']:.3g} vs {name}")
    if ratios:
        row["detail"] = "; ".join(filter(None, (row.get("detail"), "; ".join(ratios))))


def _finish(check, row: dict) -> dict:
    if not row["status"]:
        row.update(status="skipped", reason=row.get("reason") or "skipped")
    check.emit(row)
    suite.log_row(check.ctx, row)
    return row


def _floor_note(check, row: dict) -> str:
    """'N ms = xF of the measured-GEMM floor' for the headline."""
    text = f"{row['backend']}{'/' + row['variant'] if row['variant'] else ''}"
    if row.get("status") != "ok":
        return f"{text} {row['status']}"
    text += f" {row['median_ms']:.4g} ms"
    if check.matmul_tflops and row.get("flops"):
        floor_ms = row["flops"] / (check.matmul_tflops * 1e12) * 1e3
        text += f" = x{row['median_ms'] / floor_ms:.2f} floor"
    return text + ("*" if row.get("extrapolated") else "")


# ---------------------------------------------------------------------------------------------
# maxsim: COCO 5K MrSw
# ---------------------------------------------------------------------------------------------

def _mrsw_problem(sizes: PartSizes, n_img: int, n_cap: int) -> cases.Shape:
    return cases.Shape(n_img, n_cap, sizes.regions, sizes.lengths[0], sizes.d, sizes.dtype, "coco5k-mrsw",
                       sizes.lengths[1])


def _mrsw_call(backend: str, variant: str, img, cap, lens, dev) -> Callable:
    import rcar_fast

    if variant == "direct":
        def run():
            with torch.no_grad():
                return rcar_fast.max_similarity(img, cap, lens, backend=backend, **MRSW)
        return run
    if backend == maxsim_bench.NAIVE:
        raise ValueError("naive_padded has no all_pairs path")
    return lambda: rcar_fast.all_pairs(img, cap, lens, MRSW_PRESET, backend=backend, device=dev,
                                       progress=False)


def _mrsw_row(check, psizes, lens, backend: str, variant: str) -> dict:
    target = _mrsw_problem(psizes, *psizes.mrsw)
    row = maxsim_bench._row(check.ctx, "head_mrsw", target, lens, "forward", backend)
    row.update(variant=variant, detail=(
        "rcar_fast.max_similarity on all pairs, scores on the device" if variant == "direct"
        else "rcar_fast.all_pairs(..., 'colbert'), default blocks, matrix on the host"))
    return row


def _measure_mrsw(check, psizes, row, inputs, call_of, sample: tuple, full_ok: bool,
                  reference) -> None:
    """Measures `row` at `sample` (n_img, n_cap); again at the whole shape when full_ok and
    the sample predicts a call under psizes.full_call_max_s; else extrapolates per pair.
    Checks the output on the reference's slice."""
    target = _mrsw_problem(psizes, *psizes.mrsw)
    full_lens = inputs[2]
    key = ("head_mrsw", row["variant"], row["backend"], row["dtype"], "gpu-parts")
    size = sample
    sub = gpu_check._slice(inputs, *size)
    out = _measure(check, row, call_of(*sub), maxsim_bench.tile_flops(_mrsw_problem(psizes, *size), sub[2]),
                   psizes.dtype, key)
    if row["status"] != "ok":
        return
    factor = target.pairs / (size[0] * size[1])
    predicted_s = row["median_ms"] / 1e3 * factor
    if full_ok and factor > 1 and predicted_s < psizes.full_call_max_s and check.out_of_time() is None:
        del out
        measured = dict(row)
        out = _measure(check, row, call_of(*inputs), maxsim_bench.tile_flops(target, full_lens),
                       psizes.dtype, key)
        if row["status"] != "ok":   # the subset's time stands, extrapolated, with the reason
            reason = row.get("reason", "")
            row.clear()
            row.update(measured, detail=f"{measured['detail']}; whole shape failed: {reason}"[:300])
        else:
            size, factor = psizes.mrsw, 1.0
    if reference is not None and out is not None:
        ref_inputs, ref_out = reference
        a, b = ref_out.shape
        if size[0] >= a and size[1] >= b:
            row["err_vs_reference"] = suite.relative_error(out[:a, :b].float().cpu(), ref_out.float().cpu())
    del out
    if factor > 1:
        gpu_check._extrapolate(row, factor, maxsim_bench.tile_flops(target, full_lens), size)


def mrsw_inputs(check, psizes: PartSizes) -> tuple:
    """(img, cap, lens) of the whole MrSw shape, made on the device in the part's dtype."""
    lens = cases.caption_lengths(psizes.mrsw[1], *psizes.lengths)
    img, cap = cases.device_inputs(psizes.mrsw[0], psizes.regions, lens, psizes.d, psizes.dtype, check.device)
    return img, cap, lens.to(check.device)


def mrsw_baselines(check, psizes: PartSizes, inputs) -> tuple:
    """The reference and naive_padded rows (on slices, extrapolated; emitted); returns
    (baseline name -> median ms or None, (the reference's slice, its output) or None)."""
    dev, dtype = check.device, psizes.dtype
    baselines, reference = {}, None
    for backend, sample in (("reference", psizes.mrsw_reference), (maxsim_bench.NAIVE, psizes.mrsw_naive)):
        row = _mrsw_row(check, psizes, inputs[2], backend, "direct")
        if backend == "reference":
            row["detail"] = "rcar_fast.max_similarity(backend='reference')"
            reason = _skip_reason(check, backend, "maxsim", dtype)

            def call_of(i, c, n):
                return _mrsw_call("reference", "direct", i, c, n, dev)
        else:
            row["detail"] = "padded GEMM + mask + amax per chunk of images (bench.maxsim)"
            reason = check.out_of_time()

            def call_of(i, c, n):
                return lambda: maxsim_bench.naive_padded_head(i, c, n, chunk_bytes=psizes.chunk_bytes, **MRSW)
        if reason is None:
            _measure_mrsw(check, psizes, row, inputs, call_of, sample, False, None)
            if backend == "reference" and row["status"] == "ok":
                sub = gpu_check._slice(inputs, *sample)
                reference = (sub, call_of(*sub)())
                row["err_vs_reference"] = 0.0
        else:
            row["reason"] = reason
        baselines[backend] = row.get("median_ms") if row.get("status") == "ok" else None
        _finish(check, row)
    return baselines, reference


def mrsw_fast_rows(check, psizes: PartSizes, inputs, variant: str, baselines: dict, reference) -> list:
    """One row per fast backend of op "maxsim" (variant "direct" or "" = all_pairs), emitted."""
    rows = []
    for backend in _fast_backends():
        row = _mrsw_row(check, psizes, inputs[2], backend, variant)
        reason = _skip_reason(check, backend, "maxsim", psizes.dtype)
        if reason is None:
            _measure_mrsw(check, psizes, row, inputs,
                          lambda i, c, n, b=backend: _mrsw_call(b, variant, i, c, n, check.device),
                          psizes.mrsw_subset, True, reference)
            _speedups(row, baselines)
        else:
            row["reason"] = reason
        rows.append(_finish(check, row))
    return rows


# ---------------------------------------------------------------------------------------------
# maxsim: the ColBERT shape
# ---------------------------------------------------------------------------------------------

def colbert_rows(check, psizes: PartSizes, n_queries: int) -> list:
    Ld, Lq, dim = psizes.colbert
    problem = cases.Shape(psizes.colbert_docs, n_queries, Ld, Lq, dim, psizes.dtype, "colbert", "fixed")
    d, q, q_lens, d_lens = maxsim_bench.make_inputs(problem, check.device)
    flops = maxsim_bench.tile_flops(problem, q_lens)
    rows, baselines, reference_out = [], {}, None
    order = ("reference", maxsim_bench.EINSUM) + _fast_backends() + LATE_PEERS
    for backend in order:
        row = maxsim_bench._row(check.ctx, "maxsim", problem, q_lens, "forward", backend)
        reason = check.out_of_time()
        if reason is None and backend in ("reference",) + gpu_check.FAST_BACKENDS:
            reason = _skip_reason(check, backend, "maxsim", psizes.dtype)
        call = None
        if reason is None:
            call, reason = maxsim_bench.late_call(backend, q, d, q_lens, d_lens, chunk_bytes=psizes.chunk_bytes)
        if call is not None:
            def run(call=call):
                with torch.no_grad():
                    return call()
            out = _measure(check, row, run, flops, psizes.dtype, ("maxsim", backend, n_queries))
            if out is not None:
                if backend == "reference":
                    reference_out = out
                row["err_vs_reference"] = suite.relative_error(out, reference_out)
                if backend in ("reference", maxsim_bench.EINSUM):
                    baselines[backend] = row["median_ms"]
            del out
            _speedups(row, baselines)
        else:
            row["reason"] = reason
        rows.append(_finish(check, row))
    del d, q
    return rows


def _colbert_step(check, psizes: PartSizes, n_queries: int, notes: list) -> None:
    check.ctx.log(f"maxsim colbert: {n_queries} queries x {psizes.colbert_docs} documents")
    try:
        for r in colbert_rows(check, psizes, n_queries):
            if r["backend"] in gpu_check.FAST_BACKENDS and r["status"] == "ok":
                vs = [part for part in r.get("detail", "").split("; ") if part.endswith(maxsim_bench.EINSUM)]
                notes.append(" ".join([f"{n_queries}q {r['backend']} {r['median_ms']:.3g} ms"] + vs))
    except Exception as err:
        check.emit(gpu_check._step_failed(check, f"inputs_colbert_{n_queries}", psizes.dtype, err))


def run_maxsim(check) -> list:
    """The maxsim part (module doc), in this order: ceilings, MrSw baselines and direct rows,
    ColBERT 1 query, MrSw all_pairs rows, ColBERT at the further query counts."""
    psizes = part_sizes(check.sizes.dry_run)
    for row in gpu_check.measure_ceilings(check):
        check.emit(row)
    check.ctx.log(f"ceilings: matmul {check.matmul_tflops or float('nan'):.4g} TFLOP/s "
                  f"({check.sizes.matmul_n}^3 {str(check.sizes.matmul_dtype).replace('torch.', '')})")
    heads, late = [], []
    check.ctx.log(f"head_mrsw {psizes.dtype}: {psizes.mrsw[0]} x {psizes.mrsw[1]} (subset "
                  f"{psizes.mrsw_subset[0]} x {psizes.mrsw_subset[1]} first)")
    try:
        inputs = mrsw_inputs(check, psizes)
        baselines, reference = mrsw_baselines(check, psizes, inputs)
        heads += [_floor_note(check, r) for r in mrsw_fast_rows(check, psizes, inputs, "direct", baselines, reference)]
        _colbert_step(check, psizes, psizes.colbert_queries[0], late)
        heads += [_floor_note(check, r) for r in mrsw_fast_rows(check, psizes, inputs, "", baselines, reference)]
        del inputs, reference
    except Exception as err:
        check.emit(gpu_check._step_failed(check, "head_mrsw", psizes.dtype, err))
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
    for n_queries in psizes.colbert_queries[1:]:
        _colbert_step(check, psizes, n_queries, late)
    check.headline = ("maxsim: MrSw coco5k " + ("; ".join(heads) or "no fast row") + " | colbert "
                      + ("; ".join(late) or "no fast row"))
    return check.rows


# ---------------------------------------------------------------------------------------------
# rcar-backward
# ---------------------------------------------------------------------------------------------

def _rcar_row(check, op, shape, inputs, head, mode: str, backend: str, reference: dict) -> dict:
    """One backward / train_step row of the RCAR head on `backend`; reference: the reference
    row's output ("out") and row ("row") of this mode, filled by the reference's own row."""
    from bench import flops as flop_model

    ctx = check.ctx
    img, cap, lens = inputs
    row = suite.base_row(ctx, op, shape, lens, mode, backend)
    row["detail"] = "eval-mode head (no dropout); gradients of img, cap and every weight"
    reason = _skip_reason(check, backend, "rcar", shape.dtype) or suite.forward_only_reason("rcar", backend, True)
    run = None
    if reason is None:
        try:
            run, reason = suite.mode_fn(mode, suite.similarity_fn(ctx, op, backend, head), img, cap, lens, head)
        except Exception as err:   # the graph-building forward failed (out of memory, ...)
            suite.record_failure(ctx, row, err, (op.name, mode, backend), f"{op.name} {mode} {backend}")
    if run is not None:
        flops = suite.forward_flops(op, shape, lens, head) * flop_model.MODE_FACTOR[mode]
        out = _measure(check, row, run, flops, shape.dtype, (op.name, mode, backend, op.sim_dim))
        del run
        if out is not None:
            if backend == "reference":
                reference.update(out=out, row=row)
            row["err_vs_reference"] = suite.relative_error(out, reference.get("out"))
        del out
    row["reason"] = row.get("reason") or reason
    base = reference.get("row")
    if backend != "reference" and base is not None and row.get("status") == "ok":
        _speedups(row, {"reference": base["median_ms"]})
        if base.get("peak_mem_mb") and row.get("peak_mem_mb"):
            row["memory_ratio"] = base["peak_mem_mb"] / row["peak_mem_mb"]
            row["detail"] += f"; x{row['memory_ratio']:.3g} less peak memory than reference"
    return _finish(check, row)


def run_rcar_backward(check, sim_dim: int) -> list:
    """The rcar-backward part (module doc) at sim_dim (the dry run: sim_dim / 16)."""
    psizes = part_sizes(check.sizes.dry_run)
    op = cases.rcar_op("coop_rcar", 2, "t2i", max(4, sim_dim // psizes.sim_dim_divisor))
    B = psizes.batch
    shape = cases.Shape(B, B, psizes.regions, psizes.lengths[0], psizes.d, psizes.dtype, "batch",
                        psizes.lengths[1])
    ctx = check.ctx
    ctx.log(f"{op.name} sim_dim {op.sim_dim} {psizes.dtype}: B = {B} (all B x B pairs), backward and "
            "train step, reference then triton")
    inputs = cases.make_inputs(shape, check.device)
    head = suite.make_head(op, shape, check.device)
    notes = []
    for mode in [m for m in ("backward", "train_step") if not ctx.modes or m in ctx.modes]:
        reference = {}
        for backend in ("reference", "triton"):
            row = _rcar_row(check, op, shape, inputs, head, mode, backend, reference)
        if row["status"] == "ok" and row.get("memory_ratio"):
            notes.append(f"{mode} x{row['speedup_vs_reference']:.3g} faster, x{row['memory_ratio']:.3g} less memory")
        else:
            notes.append(f"{mode} triton {row['status']}" + (" (no reference)" if row["status"] == "ok" else ""))
        del reference
    del inputs
    ctx.log(f"sparse and full hardest-negative loss, B = {B}, reference and triton")
    keep = ctx.backends
    ctx.backends = ("reference", "triton")
    try:
        loss_rows = suite.run_loss_case(ctx, cases.LossCase(op, (shape,)))
        suite.add_speedups(loss_rows)
        for row in loss_rows:
            check.emit(row)
    except Exception as err:
        check.emit(gpu_check._step_failed(check, f"loss_{op.name}", shape.dtype, err))
    finally:
        ctx.backends = keep
    check.headline = f"rcar-backward sim_dim {op.sim_dim} B {B}: " + "; ".join(notes)
    return check.rows


# ---------------------------------------------------------------------------------------------
# rcar-forward: the Triton RCAR kernel's tiles at the COCO 5K shape
# ---------------------------------------------------------------------------------------------

def _tile_variant(tile: int, dtype, interpreter: bool) -> str:
    """'tile<i> rows<least rows of a work item> sw<alignment column group>' as launched."""
    from rcar_fast.kernels import rcar as kernels

    if interpreter:   # one tile whatever the index
        return f"tile{tile} rows{kernels.INTERPRETER_ROWS} sw{kernels.INTERPRETER_TILE['SW']}"
    chunks = kernels.gpu_tiles(dtype)[tile]
    return f"tile{tile} rows{chunks['ROWS']} sw{chunks['SW']}"


def _rcar_forward_row(check, op, target, sample, weights, head, inputs, full_lens, tile: int,
                      reference) -> dict:
    """One tile's row: the kernel on the sample (Shape `sample`), extrapolated to `target`;
    `reference` (the float64 reference's scores on a slice) gives err_vs_reference."""
    from rcar_fast.kernels import rcar as kernels

    img, cap, lens = inputs
    row = suite.base_row(check.ctx, op, target, full_lens, "forward", "triton",
                         _tile_variant(tile, target.dtype, img.device.type == "cpu"))
    row["detail"] = "kernels/rcar.py rcar_forward, one launch on the sample; scores stay on the device"
    reason = _skip_reason(check, "triton", "rcar", target.dtype)
    if reason:
        row.update(status="skipped", reason=reason)
        return _finish(check, row)
    lens_list = lens.tolist()
    options = dict(regulator=head.regulator, steps=head.steps, direction=head.direction, smooth=head.smooth)

    def run():
        return kernels.rcar_forward(img, cap, lens_list, weights, tile=tile, **options)

    out = _measure(check, row, run, suite.forward_flops(op, sample, lens, head), target.dtype,
                   ("rcar-forward", op.name, tile))
    if out is not None:
        n_i, n_c = reference.shape
        row["err_vs_reference"] = suite.relative_error(out[:n_i, :n_c], reference)
        if target.pairs != sample.pairs:
            gpu_check._extrapolate(row, target.pairs / sample.pairs,
                                   suite.forward_flops(op, target, full_lens, head), (sample.n_img, sample.n_cap))
    return _finish(check, row)


def run_rcar_forward(check, sim_dim: int = 256) -> list:
    """The rcar-forward part (module doc): t2i then i2t, each tile of the space in turn."""
    from rcar_fast.kernels import rcar as kernels

    from rcar_fast.ops.rcar import pack_weights

    psizes = part_sizes(check.sizes.dry_run)
    n_img, n_cap = psizes.rcar_forward
    full_lens = cases.caption_lengths(psizes.mrsw[1], psizes.lengths[0], psizes.lengths[1])
    lens = full_lens[:n_cap]
    target = cases.Shape(*psizes.mrsw, psizes.regions, psizes.lengths[0], psizes.d, psizes.dtype,
                         "coco5k", psizes.lengths[1])
    shape = dataclasses.replace(target, n_img=n_img, n_cap=n_cap)
    interpreter = check.device.type == "cpu"
    notes = []
    n_tiles = 1 if interpreter else len(kernels.gpu_tiles(psizes.dtype))
    for direction in ("t2i", "i2t"):
        op = cases.rcar_op("coop_rcar", 2, direction, max(4, sim_dim // psizes.sim_dim_divisor))
        check.ctx.log(f"{op.name} sim_dim {op.sim_dim} {psizes.dtype}: rcar_forward per tile on "
                      f"{n_img} x {n_cap}, extrapolated to {psizes.mrsw[0]} x {psizes.mrsw[1]}")
        try:
            img, cap = cases.device_inputs(n_img, psizes.regions, lens, psizes.d, psizes.dtype, check.device)
            head = suite.make_head(op, shape, check.device)
            r_i, r_c = psizes.rcar_reference
            with torch.no_grad():
                reference = head.double()(img[:r_i].double(), cap[:r_c].double(), lens[:r_c],
                                          backend="reference").float()
            head = head.to(psizes.dtype)
            weights = pack_weights(head, psizes.dtype, interpreter)   # once for every tile
        except Exception as err:
            check.emit(gpu_check._step_failed(check, f"rcar_forward_{direction}", psizes.dtype, err))
            continue
        rows = [_rcar_forward_row(check, op, target, shape, weights, head, (img, cap, lens), full_lens, tile,
                                  reference)
                for tile in range(n_tiles)]
        best = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["median_ms"], default=None)
        notes.append(f"{direction} " + (f"{best['median_ms'] / 1e3:.3g} s ({best['variant']})" if best else "no row"))
        del img, cap, head, weights
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    check.headline = (f"rcar-forward COCO 5K coop_rcar(2) sim_dim {op.sim_dim}, best tile: " + "; ".join(notes)
                      + " (targets t2i <= 8 s, i2t <= 20 s)")
    return check.rows
