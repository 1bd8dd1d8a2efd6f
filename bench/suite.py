"""Running a plan: every (op, mode, shape) against every usable backend and the baselines.

Heads come from the head registry (rcar_fast.scorers): a case names a head and its options
(bench/cases.py), and the head's scorer builds the model, makes the call, gives the compile
baseline (its vectorised reference) and the model FLOPs; nothing here names a head.

Backends come from rcar_fast.dispatch, so the suite grows as backends register:
* a backend the environment lacks (no GPU, no extension, triton without the interpreter)
  gets no rows; the summary lists it with its reason;
* a backend that is present but rejects the op or dtype gets a "skipped" row with
  dispatch's reason;
* baselines: "reference_loop" (the public code's caption-at-a-time algorithm),
  "reference" (vectorised), "reference_compile" (the vectorised reference under
  torch.compile; skipped with a reason where the plan says compiling is too slow).

Every measured row also records its error against the "reference" backend in the same dtype
(err_vs_reference = max |out - ref| / max |ref|: the scores in forward rows, the gradients in
backward / train_step rows, the loss and its gradients in loss rows, worst over the tensors),
so a fast wrong kernel shows up in the table instead of at the top of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional

import torch

from bench import cases as _cases
from bench import flops as _flops
from bench import measure

from rcar_fast import dispatch, losses, pairs, scorers

BASELINES = ("reference_loop", "reference", "reference_compile")
OUT_OF_MEMORY = float("inf")   # ctx.slow marker: the backend ran out of memory at this key


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def forward_only_reason(dispatch_op: str, backend: str, needs_backward: bool) -> Optional[str]:
    """A skip reason for a row that needs a backward on a forward-only backend (its
    capability flag in rcar_fast.dispatch), before anything runs."""
    impl = dispatch.implementation(dispatch_op, backend)
    if needs_backward and impl is not None and not impl.has_backward:
        return f"skipped: {backend} {dispatch_op} is forward-only (no backward)"
    return None


def record_failure(ctx: RunContext, row: dict, err: BaseException, skip_key, what: str) -> None:
    """An error row; out of memory also skips the larger sizes of the same series."""
    row.update(status="error", reason=error_text(err))
    if is_out_of_memory(err):
        ctx.slow[skip_key] = OUT_OF_MEMORY
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ctx.log(f"  error: {what}: {error_text(err)}")


@contextlib.contextmanager
def failures_recorded(ctx: RunContext, row: dict, skip_key, what: str):
    """Runs a row's measurement; an error is recorded in the row (record_failure), not raised:
    one broken backend must not stop the suite."""
    try:
        yield
    except Exception as err:
        record_failure(ctx, row, err, skip_key, what)


def keep_row(ctx: RunContext, rows: list, row: dict, reason: Optional[str]) -> None:
    """The row, skipped with `reason` when nothing measured it, kept and logged."""
    if not row["status"]:
        row.update(status="skipped", reason=reason)
    rows.append(row)
    log_row(ctx, row)


@dataclasses.dataclass
class RunContext:
    plan: _cases.Plan
    device: torch.device
    common: dict                       # columns shared by every row (run id, device, versions)
    peak_name: str                     # GPU name for the peak table ('' on CPU)
    backends: Optional[tuple] = None   # --backends filter
    modes: Optional[tuple] = None      # --modes filter
    log: Callable = print
    deadline: Optional[float] = None   # time.perf_counter() after which no new row starts
    slow: dict = dataclasses.field(default_factory=dict)      # skip key -> seconds
    compiled: dict = dataclasses.field(default_factory=dict)  # compile cache


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:300]


def candidate_backends(ctx: RunContext, dispatch_op: str, dtype: torch.dtype, with_compile: bool):
    """[(backend, skip reason or None)] for one op and dtype, in measuring order (the
    vectorised reference first: the others are checked against its output)."""
    found = []
    for backend in dispatch.BACKENDS:
        if ctx.backends and backend not in ctx.backends:
            continue
        if dispatch.environment_reason(backend, ctx.device.type) is not None:
            continue   # absent on this machine: reported once in the summary
        found.append((backend, dispatch.rejection(dispatch_op, backend, ctx.device, dtype)))
    if with_compile and (not ctx.backends or "reference_compile" in ctx.backends):
        found.append(("reference_compile", ctx.plan.compile))
    return found


# ---------------------------------------------------------------------------------------------
# The callables being measured
# ---------------------------------------------------------------------------------------------

def make_head(op: _cases.OpSpec, shape: _cases.Shape, device) -> Optional[torch.nn.Module]:
    """The op's head module (seeded weights, eval mode, on device in the shape's dtype), or
    None for a head without weights (its name and keywords are op.scan_kwargs())."""
    torch.manual_seed(0)
    model, _ = op.build(shape.d)
    if not isinstance(model, torch.nn.Module):
        return None
    # Dropout off: every backend then computes the same function (dropout masks differ).
    return model.to(device=device, dtype=shape.dtype).eval()


def op_scoring(op: _cases.OpSpec, head: Optional[torch.nn.Module]) -> scorers.Scoring:
    """The head of a row: make_head's module, or the op's head name and keywords."""
    if head is not None:
        return scorers.scoring(head)
    model, kwargs = op.build(None)
    return scorers.scoring(model, kwargs)


def similarity_fn(ctx: RunContext, op: _cases.OpSpec, backend: str, head) -> Callable:
    """fn(img, cap, lens) -> (n_img, n_cap) for a backend or baseline. The compiled baseline
    (the head's vectorised reference) is compiled once per op and head with dynamic shapes,
    so a sweep does not recompile at every size (its compile time shows in first_call_ms)."""
    scoring = op_scoring(op, head)
    if backend == "reference_compile":
        key = (op, id(head))
        if key not in ctx.compiled:
            ctx.compiled[key] = torch.compile(scoring.vectorized_reference(), dynamic=True)
        return ctx.compiled[key]
    return lambda img, cap, lens: pairs.all_pairs_scores(img, cap, lens, model=scoring.model,
                                                         backend=backend, **scoring.settings)


def _grad_inputs(img, cap, head):
    img_g = img.detach().clone().requires_grad_(True)
    cap_g = cap.detach().clone().requires_grad_(True)
    targets = [img_g, cap_g] + ([] if head is None else list(head.parameters()))
    return img_g, cap_g, targets


def mode_fn(mode: str, fn: Callable, img, cap, lens, head):
    """(callable to time, skip reason or None) for forward / backward / train_step."""
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(img, cap, lens)
        return forward, None
    img_g, cap_g, targets = _grad_inputs(img, cap, head)
    out = fn(img_g, cap_g, lens)
    if not out.requires_grad:
        return None, "this backend's output has no autograd graph (forward only)"
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
    if mode == "backward":
        graph = out   # the timed call replays this one graph's backward
        return (lambda: torch.autograd.grad(graph, targets, grad_out, retain_graph=True)), None
    del out
    return (lambda: torch.autograd.grad(fn(img_g, cap_g, lens), targets, grad_out)), None


def measure_rebuilt_backward(ctx: RunContext, row: dict, fn: Callable, img, cap, lens, head,
                             model_flops: float, dtype: torch.dtype, skip_key):
    """A backward row for a function whose graph cannot be replayed: torch.compile's backward
    reuses (donates) its saved buffers, so mode_fn's one graph run again and again fails, or
    with donation switched off gives wrong gradients from the second run on. Each timed call
    builds its graph afresh: backward = (forward + backward) - forward, both medians measured
    here with the same inputs and upstream gradient as mode_fn's. Peak memory: the forward +
    backward call's (the saved activations included). Returns the gradients."""
    img_g, cap_g, targets = _grad_inputs(img, cap, head)
    out = fn(img_g, cap_g, lens)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
    del out

    def forward():     # the graph is built (and dropped) as in forward_backward
        return fn(img_g, cap_g, lens)

    def forward_backward():
        return torch.autograd.grad(fn(img_g, cap_g, lens), targets, grad_out)

    forward_row = dict(row)
    measure_into(ctx, forward_row, forward, model_flops / 2, dtype, skip_key + ("forward",))
    grads = measure_into(ctx, row, forward_backward, model_flops, dtype, skip_key)
    backward_ms = row["median_ms"] - forward_row["median_ms"]
    if backward_ms <= 0:
        raise RuntimeError(f"backward time not resolved: forward + backward {row['median_ms']:.4g} ms <= "
                           f"forward {forward_row['median_ms']:.4g} ms")
    row.update(median_ms=backward_ms, min_ms=max(0.0, row["min_ms"] - forward_row["min_ms"]),
               gflops_per_s=model_flops / (backward_ms / 1e3) / 1e9,
               detail="; ".join(filter(None, (row.get("detail"), (
                   f"(forward + backward) {row['median_ms']:.4g} ms - forward {forward_row['median_ms']:.4g} "
                   "ms, a fresh graph per call (a compiled backward cannot be replayed); peak memory of "
                   "forward + backward")))))
    if row.get("peak_tflops"):
        row["pct_peak"] = 100.0 * model_flops / (backward_ms / 1e3) / 1e12 / row["peak_tflops"]
    ctx.slow[skip_key] = backward_ms / 1e3
    return grads


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

def base_row(ctx: RunContext, op: _cases.OpSpec, shape: _cases.Shape, lens, mode: str,
              backend: str, variant: str = "") -> dict:
    return dict(ctx.common, op=op.name, family=op.scorer.name, variant=variant, mode=mode,
                backend=backend, detail="", sweep=shape.sweep,
                dtype=str(shape.dtype).replace("torch.", ""), n_img=shape.n_img,
                n_cap=shape.n_cap, pairs=shape.pairs, regions=shape.regions,
                mean_len=round(float(lens.float().mean()), 2), max_len=int(lens.max()),
                d=shape.d, sim_dim=op.sim_dim or "", lengths=shape.lengths, status="", reason="")


def forward_flops(op: _cases.OpSpec, shape: _cases.Shape, lens, head=None) -> float:
    """The head's model FLOPs over all pairs of the shape (its scorer's FLOP model)."""
    if head is None:   # a module head's FLOPs read its settings: build one where not given
        head = make_head(op, shape, "cpu")
    return op_scoring(op, head).forward_flops(shape.n_img, lens.tolist(), shape.regions, shape.d)


def _pairs_flops(op: _cases.OpSpec, shape: _cases.Shape, pair_lens, head) -> float:
    return op_scoring(op, head).pair_flops(pair_lens, shape.regions, shape.d)


def relative_error(out, ref) -> Optional[float]:
    """max |out - ref| / max |ref| over a tensor or a tuple of tensors (gradients) taken
    together: per tensor, a weight whose gradient is ~0 would turn rounding into O(1) errors."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    refs = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs) or any(not torch.is_tensor(a) or not torch.is_tensor(b)
                                     or a.shape != b.shape for a, b in zip(outs, refs)):
        return None
    scale = max(b.double().abs().max().item() if b.numel() else 0.0 for b in refs) or 1.0
    worst = max((a.double() - b.double()).abs().max().item() if b.numel() else 0.0
                for a, b in zip(outs, refs))
    return worst / scale


def measure_into(ctx: RunContext, row: dict, run: Callable, model_flops: float,
                  dtype: torch.dtype, skip_key) -> Optional[object]:
    """Times run(), measures its memory, fills the row; returns one output of run()."""
    timing, memory = measure.measure_call(run, ctx.device, budget_s=ctx.plan.budget_s,
                                          min_repeats=ctx.plan.min_repeats,
                                          max_repeats=ctx.plan.max_repeats,
                                          single_over_s=ctx.plan.single_call_over_s,
                                          warmup_only_over_s=ctx.plan.warmup_only_over_s)
    output = memory.result
    # Steady-state time decides skips (the first call may hold torch.compile's compile time).
    ctx.slow[skip_key] = timing.median_s
    seconds = timing.median_s
    if timing.repeats == 0:
        row["detail"] = "; ".join(filter(None, (row.get("detail"), "timed from the warm-up call "
                                                "(compile / autotune included): over the plan's limit")))
    row.update(status="ok", median_ms=seconds * 1e3, min_ms=timing.min_s * 1e3,
               repeats=timing.repeats, first_call_ms=timing.first_s * 1e3,
               peak_mem_mb=None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
               mem_method=memory.method, flops=model_flops,
               gflops_per_s=model_flops / seconds / 1e9 if seconds > 0 else None)
    if ctx.peak_name:
        from bench.device import peak_tflops

        peak = peak_tflops(ctx.peak_name, dtype)
        if peak:
            row.update(peak_tflops=peak, pct_peak=100.0 * model_flops / seconds / 1e12 / peak)
    return output


def baseline_limit_reason(ctx: RunContext, backend: str, pairs: int) -> Optional[str]:
    """Why a slow baseline is not run at this size (the plan measures it at smaller ones)."""
    limit = ctx.plan.baseline_limit(backend)
    if limit is not None and pairs > limit:
        return (f"skipped: the {ctx.plan.name} plan measures {backend} up to {limit} pairs only "
                f"(this row has {pairs})")
    return None


def deadline_reason(ctx: RunContext) -> Optional[str]:
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        return "skipped: the run's time limit (--max-minutes) was reached"
    return None


def _skip_reason(ctx: RunContext, skip_key) -> Optional[str]:
    late = deadline_reason(ctx)
    if late:
        return late
    seconds = ctx.slow.get(skip_key)
    if seconds == OUT_OF_MEMORY:
        return "skipped: ran out of memory at a smaller size"
    if seconds is not None and seconds > ctx.plan.skip_after_s:
        return (f"skipped: a call took {seconds:.1f} s at the previous (smaller) size, over the "
                f"plan's {ctx.plan.skip_after_s:.0f} s limit")
    return None


def run_op_case(ctx: RunContext, case: _cases.OpCase) -> list:
    rows = []
    op = case.op
    modes = [m for m in case.modes if not ctx.modes or m in ctx.modes]
    for shape in case.shapes:
        # The lengths now, the tensors when a row first runs: a shape whose rows are all
        # skipped (time limit, baselines only) allocates nothing (the COCO 5K row: GBs).
        lens = _cases.caption_lengths(shape.n_cap, shape.mean_len, shape.lengths).to(ctx.device)
        inputs = None
        head = make_head(op, shape, ctx.device)
        op_flops = forward_flops(op, shape, lens, head)
        for mode in modes:
            reference_out = None
            for backend, reason in candidate_backends(ctx, op.dispatch_op, shape.dtype, True):
                row = base_row(ctx, op, shape, lens, mode, backend)
                skip_key = (op.name, "", mode, backend, row["dtype"], shape.sweep, shape.d, shape.mean_len)
                reason = (reason or forward_only_reason(op.dispatch_op, backend, mode != "forward")
                          or baseline_limit_reason(ctx, backend, shape.pairs)
                          or _skip_reason(ctx, skip_key))
                if reason is None:
                    with failures_recorded(ctx, row, skip_key, f"{op.name} {mode} {backend}"):
                        if inputs is None:
                            inputs = _cases.make_inputs(shape, ctx.device)
                        img, cap, _ = inputs
                        fn = similarity_fn(ctx, op, backend, head)
                        if backend == "reference_compile" and mode == "backward":
                            run = None
                            out = measure_rebuilt_backward(ctx, row, fn, img, cap, lens, head,
                                                           op_flops * _flops.MODE_FACTOR[mode], shape.dtype,
                                                           skip_key)
                            row["err_vs_reference"] = relative_error(out, reference_out)
                            del out
                        else:
                            run, reason = mode_fn(mode, fn, img, cap, lens, head)
                        if run is not None:
                            out = measure_into(ctx, row, run, op_flops * _flops.MODE_FACTOR[mode],
                                                shape.dtype, skip_key)
                            # Forward: the scores; backward / train_step: the gradients.
                            if backend == "reference":
                                reference_out = out
                            row["err_vs_reference"] = relative_error(out, reference_out)
                            del run, out
                keep_row(ctx, rows, row, reason)
    return rows


def run_loss_case(ctx: RunContext, case: _cases.LossCase) -> list:
    """Sparse (<= 3B pairs with autograd) vs full (B x B) hardest-negative loss, per backend:
    one training step of the similarity (loss + gradients w.r.t. img, cap and head weights)."""
    rows = []
    op = case.op
    if ctx.modes and "train_step" not in ctx.modes:
        return rows
    for shape in case.shapes:
        img, cap, lens = _cases.make_inputs(shape, ctx.device)
        head = make_head(op, shape, ctx.device)
        scoring = op_scoring(op, head)
        model, kwargs = scoring.model, scoring.settings
        all_pairs = forward_flops(op, shape, lens, head)
        # The sparse loss recomputes at most 3B pairs: the B positives and 2B negatives.
        pair_flops = _pairs_flops(op, shape, lens.tolist() * 3, head)
        reference_loss = None
        for backend, reason in candidate_backends(ctx, op.dispatch_op, shape.dtype, False):
            for variant in ("full", "sparse"):
                row = base_row(ctx, op, shape, lens, "train_step", backend, variant)
                row["op"] = f"loss_{op.name}"
                skip_key = (row["op"], variant, "train_step", backend, row["dtype"], shape.sweep)
                row_reason = (reason or forward_only_reason(op.dispatch_op, backend, variant == "full")
                              or baseline_limit_reason(ctx, backend, shape.pairs)
                              or _skip_reason(ctx, skip_key))
                if row_reason is None:
                    with failures_recorded(ctx, row, skip_key, f"{row['op']} {variant} {backend}"):
                        run, detail = loss_step(ctx, variant, model, backend, img, cap, lens, head, kwargs)
                        row["detail"] = detail
                        model_flops = 3 * all_pairs if variant == "full" else all_pairs + 3 * pair_flops
                        out = measure_into(ctx, row, run, model_flops, shape.dtype, skip_key)
                        # The loss value and its gradients against the reference's full loss.
                        if backend == "reference" and variant == "full":
                            reference_loss = out
                        row["err_vs_reference"] = relative_error(
                            tuple(t.reshape(-1) for t in out),
                            None if reference_loss is None else tuple(t.reshape(-1) for t in reference_loss))
                        del run, out
                keep_row(ctx, rows, row, row_reason)
    return rows


def loss_step(ctx, variant, model, backend, img, cap, lens, head, kwargs):
    img_g, cap_g, targets = _grad_inputs(img, cap, head)
    if variant == "full":
        def run():
            loss = losses.full_hardest_negative_loss(img_g, cap_g, lens, model=model,
                                                    backend=backend, **kwargs)
            return (loss.detach(),) + torch.autograd.grad(loss, targets)
        return run, ""
    pairs_op = scorers.scoring(model, kwargs).scorer.pairs_op
    # The pair recompute on the row's backend where the pair op has it (the reference row stays
    # the reference throughout), else on auto's choice.
    pair_backend = (backend if dispatch.implementation(pairs_op, backend) is not None
                    and dispatch.rejection(pairs_op, backend, ctx.device, img.dtype) is None
                    else dispatch.choose(pairs_op, "auto", ctx.device, img.dtype).backend)

    def run():
        loss = losses.hardest_negative_loss(img_g, cap_g, lens, model=model, backend=backend,
                                           pair_backend=pair_backend, **kwargs)
        return (loss.detach(),) + torch.autograd.grad(loss, targets)
    return run, f"selection: {backend}, pairs: {pair_backend}"


def log_row(ctx: RunContext, row: dict) -> None:
    shape = f"{row['n_img']}x{row['n_cap']} L{row['mean_len']:.0f} d{row['d']} {row['dtype']}"
    name = f"{row['op']}{'/' + row['variant'] if row['variant'] else ''} {row['mode']}"
    if row["status"] == "ok":
        mem = row.get("peak_mem_mb")
        ctx.log(f"  {name:38s} {shape:26s} {row['backend']:18s} {row['median_ms']:10.2f} ms "
                f"{'' if mem is None else f'{mem:8.1f} MB'} {row['gflops_per_s']:8.1f} GFLOP/s")
    else:
        ctx.log(f"  {name:38s} {shape:26s} {row['backend']:18s} {row['status']}: {row['reason']}")


# ---------------------------------------------------------------------------------------------
# Speedups
# ---------------------------------------------------------------------------------------------

_SHAPE_KEYS = ("op", "mode", "dtype", "n_img", "n_cap", "mean_len", "d", "sim_dim", "sweep")


def add_speedups(rows: list) -> None:
    """speedup_vs_<baseline> = baseline's median / this row's median, within one run, same
    op / mode / shape / dtype / variant; speedup_vs_full (loss rows) = the full loss' median
    on the same backend / the sparse loss' median."""
    ok = [r for r in rows if r["status"] == "ok"]
    index = {}
    for r in ok:
        index[tuple(r[k] for k in _SHAPE_KEYS) + (r["variant"], r["backend"])] = r["median_ms"]
    for r in ok:
        key = tuple(r[k] for k in _SHAPE_KEYS)
        for baseline in BASELINES:
            base = index.get(key + (r["variant"], baseline))
            r[f"speedup_vs_{baseline}"] = None if base is None else base / r["median_ms"]
        if r["variant"] == "sparse":
            full = index.get(key + ("full", r["backend"]))
            r["speedup_vs_full"] = None if full is None else full / r["median_ms"]


def run_plan(ctx: RunContext) -> list:
    rows = []
    start = time.perf_counter()
    for case in ctx.plan.op_cases:
        ctx.log(f"{case.op.name}: modes {', '.join(case.modes)}")
        rows += run_op_case(ctx, case)
    for case in ctx.plan.loss_cases:
        ctx.log(f"loss_{case.op.name}: sparse vs full hardest-negative loss")
        rows += run_loss_case(ctx, case)
    add_speedups(rows)
    ctx.log(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return rows
