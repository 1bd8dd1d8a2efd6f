"""`python -m bench` / `rcar-fast bench`: run a benchmark plan and write the results."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import signal
import sys
import time

# A CPU dry run of the GPU check runs the Triton kernels in triton's interpreter, which acts only
# if TRITON_INTERPRET=1 is set before triton is imported (its library functions are decorated
# then), and importing torch imports triton: so set it here, ahead of every import.
if __name__ == "__main__" and {"--gpu-check", "--dry-run"} <= set(sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Run from anywhere: the repository root (bench's parent) holds the rcar_fast package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# bench.suite and bench.gpu_check import rcar_fast: imported in _run, after main() has set the
# environment the kernels read (TRITON_INTERPRET, RCAR_FAST_AUTOTUNE).
from bench import cases, device as device_facts, measure, report  # noqa: E402

DEFAULT_OUT = os.path.join(_ROOT, "bench", "results")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="rcar_fast benchmark suite: per op, mode and shape, every usable backend "
                    "against the loop / vectorised / compiled reference baselines.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="seconds: every code path once (tests)")
    size.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU "
                      "(default without a GPU)")
    size.add_argument("--full", action="store_true", help="the GPU suite (default with a GPU)")
    size.add_argument("--rcar", action="store_true", help="issue 15's RCAR rows: coop_rcar(2) "
                      "t2i, d 1024, sim_dim 256: forward / backward / train step at 8 x 40 and "
                      "the full and sparse loss at B = 32, every backend and baseline")
    size.add_argument("--gpu-check", action="store_true",
                      help="a few minutes on one GPU: hardware ceilings, SCAN / RCAR at the COCO "
                           "5K shape through all_pairs vs the references, a training step "
                           "(bench/gpu_check.py); appends to bench/results and copies the "
                           "results to --out")
    parser.add_argument("--maxsim", action="store_true",
                        help="the S-only heads (CHAN, MrSw, LAPS) and late-interaction maxsim "
                             "against the naive / einsum baselines and maxsim-cpu, flash-maxsim, "
                             "late-interaction-kernels where importable (bench/maxsim.py); size "
                             "from --tiny / --quick / --full; summary in <device>.maxsim.md")
    parser.add_argument("--part", choices=("all", "maxsim", "rcar-backward", "coco", "rcar-forward"), default=None,
                        help="with --gpu-check: one part of the check (bench/gpu_check.py, "
                             "bench/gpu_parts.py): maxsim (issue 14: COCO 5K MrSw, the ColBERT "
                             "shape), rcar-backward (issue 15: the fused RCAR backward at B = 128), "
                             "coco (SCAN / RCAR / every registered head at the COCO 5K shape), "
                             "rcar-forward (issue 15: the Triton RCAR forward per GPU tile at the "
                             "COCO 5K shape, sim_dim 256, t2i and i2t); default all, in that order")
    parser.add_argument("--sim-dim", type=int, default=None,
                        help="with --gpu-check --part rcar-backward (or all): the RCAR head's "
                             "sim_dim (default 64; the public recipe's is 256)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu-check: the same steps at tiny sizes on the CPU, written "
                             "into --out only")
    parser.add_argument("--autotune", choices=("quick", "full"), default=None,
                        help="with --gpu-check: RCAR_FAST_AUTOTUNE for the Triton kernels "
                             "(default: the environment's value, else quick)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results); "
                        "with --gpu-check: where the results are copied (--dry-run: written)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of backends / baselines to run "
                             "(e.g. reference,cpu,reference_compile)")
    parser.add_argument("--modes", default=None, help="comma-separated subset of "
                        f"{','.join(cases.MODES)}")
    parser.add_argument("--ops", default=None, help="comma-separated op names to keep "
                        "(e.g. scan_t2i,rcar_coop_rcar2_t2i; loss rows follow their op)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine, "
                             "1 avoids OpenMP threads waiting for each other's descheduled cores")
    parser.add_argument("--compile", action="store_true",
                        help="include torch.compile baselines even where the plan skips them")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new measurement after this many minutes (the rest is "
                             "recorded as skipped)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    parser.add_argument("--quiet", action="store_true", help="print only the summary paths")
    return parser


def _select_plan(args, dev: torch.device) -> cases.Plan:
    if args.tiny:
        plan = cases.tiny_plan()
    elif args.rcar:
        plan = cases.rcar_plan(dev)
    elif args.full or (not args.quick and dev.type == "cuda"):
        plan = cases.full_plan(dev)
    else:
        plan = cases.quick_plan(dev)
    if args.compile:
        plan = cases.dataclasses.replace(plan, compile=None)
    if args.ops:
        keep = set(args.ops.split(","))
        plan = cases.dataclasses.replace(
            plan, op_cases=tuple(c for c in plan.op_cases if c.op.name in keep),
            loss_cases=tuple(c for c in plan.loss_cases if c.op.name in keep))
    return plan


def _split(text):
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None


def _usage_error(args) -> str:
    """The one-line complaint about a bad combination of options, or ''."""
    if args.modes and set(_split(args.modes)) - set(cases.MODES):
        return f"--modes must be a subset of {cases.MODES}, got {_split(args.modes)}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if args.max_minutes is not None and not args.max_minutes > 0:
        return f"--max-minutes must be > 0, got {args.max_minutes}"
    if args.maxsim and args.gpu_check:
        return "--maxsim and --gpu-check are separate runs: give one of them"
    if (args.dry_run or args.autotune or args.part or args.sim_dim) and not args.gpu_check:
        return "--dry-run, --autotune, --part and --sim-dim go with --gpu-check"
    if args.sim_dim is not None and args.sim_dim < 1:
        return f"--sim-dim must be >= 1, got {args.sim_dim}"
    if args.dry_run and not args.out:
        return "--gpu-check --dry-run writes into --out DIR only: give --out"
    return ""


_CHECK_ENVIRONMENT = ("RCAR_FAST_AUTOTUNE", "TRITON_INTERPRET")


def _prepare_gpu_check_environment(args) -> str:
    """Set what the kernels read at import: the autotune mode. A dry run needs triton's
    interpreter on since before triton was imported (set at the top of this file when run as
    `python -m bench`): returns the complaint when it is not, "" otherwise."""
    if args.autotune:
        os.environ["RCAR_FAST_AUTOTUNE"] = args.autotune
    else:
        os.environ.setdefault("RCAR_FAST_AUTOTUNE", "quick")
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "") != "1":
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            return ("--gpu-check --dry-run runs the Triton kernels in triton's interpreter, which must be on "
                    "before triton is imported: set TRITON_INTERPRET=1 in the environment")
    return ""


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if args.gpu_check and args.dry_run:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    complaint = _usage_error(args)
    if complaint:
        print(complaint, file=sys.stderr)
        return 2
    dev = _device(args)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda given, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.gpu_check and not args.dry_run and dev.type != "cuda":
        print("--gpu-check needs a CUDA GPU (on a CPU: --gpu-check --dry-run --out DIR)",
              file=sys.stderr)
        return 2
    environment_before = {key: os.environ.get(key) for key in _CHECK_ENVIRONMENT}
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.gpu_check:
            complaint = _prepare_gpu_check_environment(args)
            if complaint:
                print(complaint, file=sys.stderr)
                return 2
            return _run_gpu_check(args, dev)
        if args.maxsim:
            from bench import maxsim as maxsim_bench

            return maxsim_bench.main(args, dev, _start, DEFAULT_OUT)
        return _run(args, dev, _split(args.modes))
    finally:
        # main() also runs inside other processes (the CLI, tests): leave torch and the
        # environment as they were.
        torch.set_num_threads(threads_before)
        for key, value in environment_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start(dev: torch.device, suite_name: str, quiet: bool):
    """(common row columns, run facts, log) of a new run."""
    software = device_facts.software_facts()
    name = device_facts.device_name(dev)
    slug = device_facts.device_slug(dev)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    common = dict(run_id=run_id, date=software["date"], suite=suite_name, device_slug=slug,
                  device_name=name, git_commit=software["git_commit"], torch=software["torch"],
                  triton=software["triton"], cuda=software["cuda"],
                  threads=torch.get_num_threads())
    facts = dict(software, run_id=run_id, device_name=name, device_slug=slug, suite=suite_name,
                 start=device_facts.snapshot(dev))
    log = (lambda *a, **k: None) if quiet else (lambda line: print(line, flush=True))
    log(f"rcar_fast bench: {suite_name} suite on {name} ({dev}), run {run_id}")
    return common, facts, log


def _write_results(rows, facts, results_dir: str, dev, suite_name: str, no_plots: bool,
                   csv_rows=None):
    """Appends the CSV (csv_rows: those not yet in it, default all rows) and run facts, writes
    the summary and plots; returns their paths."""
    import rcar_fast

    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, facts["device_slug"])
    csv_path = report.append_csv(stem + ".csv", rows if csv_rows is None else csv_rows)
    report.append_run_facts(stem + ".runs.jsonl", facts)
    if no_plots:
        plot_paths, plot_note = (), "not drawn (--no-plots)"
    else:
        plot_paths, plot_note = report.plots(rows, stem)
    report.write_text(stem + ".md", report.markdown(rows, facts, rcar_fast.backends(), suite_name,
                                                    plot_note, on_gpu=dev.type == "cuda"))
    print(f"results: {csv_path} ({len(rows)} rows), summary: {stem}.md, plots: {plot_note}")
    return [csv_path, stem + ".runs.jsonl", stem + ".md", *plot_paths]


def _run(args, dev: torch.device, modes) -> int:
    from bench import suite
    from rcar_fast import pairs  # noqa: F401  (registers the pair-list ops)

    if dev.type == "cpu":
        measure.configure_cpu_allocator()
    plan = _select_plan(args, dev)
    common, facts, log = _start(dev, plan.name, args.quiet)
    ctx = suite.RunContext(plan=plan, device=dev, common=common,
                           peak_name=common["device_name"] if dev.type == "cuda" else "",
                           backends=_split(args.backends), modes=modes, log=log)
    started = time.perf_counter()
    if args.max_minutes is not None:
        ctx.deadline = started + 60.0 * args.max_minutes
    rows = suite.run_plan(ctx)
    facts.update(end=device_facts.snapshot(dev), seconds=round(time.perf_counter() - started, 1),
                 rows=len(rows))
    _write_results(rows, facts, args.out or DEFAULT_OUT, dev, plan.name, args.no_plots)
    return 0


def _run_gpu_check(args, dev: torch.device) -> int:
    from bench import gpu_check, suite
    from rcar_fast import pairs  # noqa: F401  (registers the pair-list ops)

    if dev.type == "cpu":
        measure.configure_cpu_allocator()
    sizes = gpu_check.dry_sizes() if args.dry_run else gpu_check.full_sizes()
    started = time.perf_counter()
    common, facts, log = _start(dev, sizes.suite, args.quiet)
    ctx = suite.RunContext(plan=gpu_check.plan_for(sizes), device=dev, common=common,
                           peak_name=common["device_name"] if dev.type == "cuda" else "",
                           modes=_split(args.modes), log=log)
    if args.max_minutes is not None:
        ctx.deadline = started + 60.0 * args.max_minutes
    check = gpu_check.new_check(ctx, sizes)
    results_dir = args.out if args.dry_run else DEFAULT_OUT
    # Rows a part emits are appended as they are measured: a part cut by its timeout keeps them.
    # On the GPU also into --out at once: what comes back from the machine is --out alone.
    csv_paths = [os.path.join(folder, facts["device_slug"] + ".csv")
                 for folder in (results_dir, None if args.dry_run else args.out) if folder]
    for path in csv_paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def sink(row):
        for path in csv_paths:
            report.append_csv(path, [row])
    check.sink = sink
    part = args.part or "all"
    try:
        with _terminate_as_interrupt():
            rows = gpu_check.run_check(check, part, args.sim_dim or 64)
    except KeyboardInterrupt:
        # An outer `timeout` (scripts/gpu_check.sh) or Ctrl-C: keep what was measured.
        print("gpu check interrupted: writing the rows measured so far", file=sys.stderr, flush=True)
        rows = gpu_check.finish_rows(check)
        facts["interrupted"] = True
    facts.update(end=device_facts.snapshot(dev), seconds=round(time.perf_counter() - started, 1),
                 rows=len(rows), autotune=check.extra["autotune"], part=part,
                 caption_lengths=gpu_check.LENGTHS_NOTE, ceilings=gpu_check.ceiling_facts(check))
    if part in ("all", "rcar-backward"):
        facts["sim_dim"] = args.sim_dim or 64
    written = _write_results(rows, facts, results_dir, dev, sizes.suite, args.no_plots,
                             csv_rows=[r for r in rows if id(r) not in check.written])
    if args.out and not args.dry_run:
        _copy_into(written, args.out)
        print(f"copied to {args.out}: {', '.join(os.path.basename(p) for p in written)}")
    print(report.gpu_check_table(rows, facts))
    if check.headline:
        print(check.headline)
    return 1 if facts.get("interrupted") else 0


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the check runs (main thread only), so an outer
    timeout still leaves the rows measured so far on disk."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:        # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _copy_into(paths, out_dir: str) -> None:
    """Copies each file under a temporary name, then renames it: no half-copied file stays."""
    os.makedirs(out_dir, exist_ok=True)
    for path in paths:
        target = os.path.join(out_dir, os.path.basename(path))
        if os.path.abspath(target) == os.path.abspath(path):
            continue
        try:
            shutil.copyfile(path, target + ".partial")
            os.replace(target + ".partial", target)
        except BaseException:
            if os.path.exists(target + ".partial"):
                os.remove(target + ".partial")
            raise


if __name__ == "__main__":
    sys.exit(main())
