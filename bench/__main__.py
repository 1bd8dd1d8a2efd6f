"""`python -m bench` / `rcar-fast bench`: run a benchmark plan and write the results."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

# Run from anywhere: the repository root (bench's parent) holds the rcar_fast package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import cases, device as device_facts, measure, report, suite  # noqa: E402

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
    parser.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results)")
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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda given, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    modes = _split(args.modes)
    if modes and set(modes) - set(cases.MODES):
        print(f"--modes must be a subset of {cases.MODES}, got {modes}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, dev, modes)
    finally:
        # main() also runs inside other processes (the CLI, tests): leave torch as it was.
        torch.set_num_threads(threads_before)


def _run(args, dev: torch.device, modes) -> int:
    if dev.type == "cpu":
        measure.configure_cpu_allocator()
    plan = _select_plan(args, dev)
    os.makedirs(args.out, exist_ok=True)

    import rcar_fast
    from rcar_fast import pairs  # noqa: F401  (registers the pair-list ops)

    software = device_facts.software_facts()
    name = device_facts.device_name(dev)
    slug = device_facts.device_slug(dev)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    common = dict(run_id=run_id, date=software["date"], suite=plan.name, device_slug=slug,
                  device_name=name, git_commit=software["git_commit"], torch=software["torch"],
                  triton=software["triton"], cuda=software["cuda"],
                  threads=torch.get_num_threads())
    log = (lambda *a, **k: None) if args.quiet else (lambda line: print(line, flush=True))
    facts = dict(software, run_id=run_id, device_name=name, device_slug=slug, suite=plan.name,
                 start=device_facts.snapshot(dev))
    log(f"rcar_fast bench: {plan.name} suite on {name} ({dev}), run {run_id}")
    ctx = suite.RunContext(plan=plan, device=dev, common=common,
                           peak_name=name if dev.type == "cuda" else "",
                           backends=_split(args.backends), modes=modes, log=log)
    started = time.perf_counter()
    if args.max_minutes is not None:
        ctx.deadline = started + 60.0 * args.max_minutes
    rows = suite.run_plan(ctx)
    facts.update(end=device_facts.snapshot(dev), seconds=round(time.perf_counter() - started, 1),
                 rows=len(rows))

    stem = os.path.join(args.out, slug)
    csv_path = report.append_csv(stem + ".csv", rows)
    report.append_run_facts(stem + ".runs.jsonl", facts)
    if args.no_plots:
        plot_paths, plot_note = (), "not drawn (--no-plots)"
    else:
        plot_paths, plot_note = report.plots(rows, stem)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(rows, facts, rcar_fast.backends(), plan.name, plot_note,
                                on_gpu=dev.type == "cuda"))
    print(f"results: {csv_path} ({len(rows)} rows), summary: {stem}.md, plots: {plot_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
