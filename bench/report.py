"""Writing results: the CSV (appended, one per device), the run's facts (JSON lines), a
Markdown summary and plots of the latest run, all in the results folder:

    <slug>.csv          every row of every run (run_id tells runs apart)
    <slug>.runs.jsonl   one line per run: device facts at start and end, versions, plan
    <slug>.md           summary of the latest run: facts, backends, headline ratios, tables
    <slug>-time.png     median time vs pairs per backend, one panel per (op, mode)
    <slug>-memory.png   peak memory vs pairs (ops) and vs batch (sparse vs full loss)
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Optional

COLUMNS = (
    "run_id", "date", "suite", "device_slug", "device_name", "git_commit", "torch", "triton",
    "cuda", "threads", "op", "family", "variant", "mode", "backend", "detail", "sweep", "dtype", "n_img",
    "n_cap", "pairs", "regions", "mean_len", "max_len", "d", "sim_dim", "status", "reason",
    "median_ms", "min_ms", "repeats", "first_call_ms", "peak_mem_mb", "mem_method", "flops",
    "gflops_per_s", "peak_tflops", "pct_peak", "err_vs_reference",
    "speedup_vs_reference_loop", "speedup_vs_reference", "speedup_vs_reference_compile",
    "speedup_vs_full",
)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    return str(value)


def append_csv(path: str, rows: list) -> str:
    """Appends rows to path (header written for a new file). A file with another header (an
    older schema) is moved aside to <path>.<n>.old first, never mixed."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != COLUMNS:
            n = 1
            while os.path.exists(f"{path}.{n}.old"):
                n += 1
            os.replace(path, f"{path}.{n}.old")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(col)) for col in COLUMNS])
    return path


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_run_facts(path: str, facts: dict) -> str:
    with open(path, "a") as f:
        f.write(json.dumps(facts, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec=".3g", missing="") -> str:
    if value is None or value == "":
        return missing
    return format(value, spec)


def _shape(row) -> str:
    return f"{row['n_img']}x{row['n_cap']}"


def _throughput(row, on_gpu: bool) -> str:
    if row.get("gflops_per_s") is None:
        return ""
    if on_gpu:
        text = f"{row['gflops_per_s'] / 1e3:.3g} TF/s"
        if row.get("pct_peak") is not None:
            text += f" ({row['pct_peak']:.1f}%)"
        return text
    return f"{row['gflops_per_s']:.3g} GF/s"


def headline(rows: list) -> list:
    """Lines quoting the ratios a reader wants first: per op and mode, at the largest shape of
    the main sweep, the fastest backend against each baseline; per loss, sparse vs full."""
    lines = []
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["sweep"] in ("pairs", "batch") and not r["variant"]:
            groups[(r["op"], r["mode"], r["dtype"])].append(r)
    for (op, mode, dtype), members in sorted(groups.items()):
        largest = max(m["pairs"] for m in members)
        at = [m for m in members if m["pairs"] == largest]
        best = min(at, key=lambda m: m["median_ms"])
        ratios = [f"{best[f'speedup_vs_{b}']:.2f}x vs {b}" for b in ("reference", "reference_loop", "reference_compile")
                  if best.get(f"speedup_vs_{b}") is not None and b != best["backend"]]
        lines.append(f"- {op} {mode} {dtype} at {_shape(best)}: fastest **{best['backend']}** "
                     f"{best['median_ms']:.3g} ms" + (f" ({', '.join(ratios)})" if ratios else ""))
    for r in rows:
        if r["status"] == "ok" and r["variant"] == "sparse" and r.get("speedup_vs_full"):
            full = next((f for f in rows if f["status"] == "ok" and f["variant"] == "full"
                         and f["backend"] == r["backend"] and f["op"] == r["op"]
                         and f["n_img"] == r["n_img"] and f["dtype"] == r["dtype"]), None)
            mem = ""
            if full is not None and full.get("peak_mem_mb") and r.get("peak_mem_mb"):
                mem = f", memory {r['peak_mem_mb']:.3g} vs {full['peak_mem_mb']:.3g} MB"
            lines.append(f"- {r['op']} B={r['n_img']} on {r['backend']}: sparse (<= 3B pairs) "
                         f"step vs full B x B step: speedup {r['speedup_vs_full']:.2f}x{mem}")
    return lines


def markdown(rows: list, facts: dict, backends_report: dict, plan_name: str,
             plot_note: str, on_gpu: bool) -> str:
    start, end = facts.get("start", {}), facts.get("end", {})
    out = [f"# rcar_fast benchmark: {facts.get('device_name', '')}", "",
           f"Run `{facts.get('run_id')}` ({plan_name} suite), {facts.get('date')}, commit "
           f"`{facts.get('git_commit') or 'unknown'}`; torch {facts.get('torch')}, triton "
           f"{facts.get('triton') or '-'}, CUDA {facts.get('cuda') or '-'}, Python {facts.get('python')}.",
           "", "## Device", "", "| fact | start | end |", "| --- | --- | --- |"]
    for key in sorted(set(start) | set(end)):
        out.append(f"| {key} | {start.get(key, '')} | {end.get(key, '')} |")
    out += ["", "## Backends", "", "| backend | available | ops | reason |", "| --- | --- | --- | --- |"]
    for name, entry in backends_report.items():
        out.append(f"| {name} | {'yes' if entry['available'] else 'no'} | {', '.join(entry['ops'])} "
                   f"| {entry['reason']} |")
    out += ["", "## Headline", ""] + (headline(rows) or ["- no measured rows"])
    out += ["", "## Method", "",
            "Median of repeated calls after one warm-up call (GPU: CUDA events / "
            "triton.testing.do_bench; CPU: time.perf_counter). Peak memory from one extra call "
            "(GPU: torch.cuda.max_memory_allocated over the memory allocated before; CPU: "
            "resident-set high-water mark over the RSS before, see bench/measure.py). "
            "Throughput = model FLOPs (bench/flops.py; backward = 2x forward, train step = 3x) "
            "/ median time. err = max |out - reference| / max |reference| (scores, or gradients in backward / train-step rows, worst tensor). "
            "Speedup = baseline median / row median, same run and shape.", "",
            f"Plots: {plot_note}", ""]
    out += _tables(rows, on_gpu)
    skipped = defaultdict(set)
    for r in rows:
        if r["status"] in ("skipped", "error"):
            skipped[(r["backend"], r["status"], r["reason"])].add(f"{r['op']} {r['mode']}")
    if skipped:
        out += ["## Skipped and failed rows", "", "| backend | status | reason | where |", "| --- | --- | --- | --- |"]
        for (backend, status, reason), where in sorted(skipped.items()):
            listed = ", ".join(sorted(where)[:6]) + (" ..." if len(where) > 6 else "")
            out.append(f"| {backend} | {status} | {reason} | {listed} |")
        out.append("")
    return "\n".join(out)


def _tables(rows: list, on_gpu: bool) -> list:
    out = []
    by_op = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            by_op[(r["op"], r["mode"])].append(r)
    for (op, mode), members in by_op.items():
        out += [f"### {op} {mode}", "",
                "| shape | L | d | dtype | variant | backend | median ms | peak MB | throughput "
                "| err | vs ref | vs loop | vs compile | vs full |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in members:
            out.append(
                f"| {_shape(r)} | {r['mean_len']:.3g} | {r['d']} | {r['dtype']} | {r['variant']} "
                f"| {r['backend']} | {_fmt(r['median_ms'])} | {_fmt(r.get('peak_mem_mb'))} "
                f"| {_throughput(r, on_gpu)} | {_fmt(r.get('err_vs_reference'), '.1e')} "
                f"| {_fmt(r.get('speedup_vs_reference'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_reference_loop'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_reference_compile'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_full'), '.2f')} |")
        out.append("")
    return out


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plots(rows: list, stem: str) -> tuple:
    """Writes <stem>-time.png and <stem>-memory.png; returns (paths, note). Without matplotlib
    returns ((), the reason)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (), "not drawn: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok" and r["sweep"] in ("pairs", "batch")]
    if not ok:
        return (), "not drawn: no measured rows"
    time_path = _panel_plot(plt, ok, stem + "-time.png", "median_ms", "median time (ms)",
                            lambda r: not r["variant"])
    memory_path = _panel_plot(plt, ok, stem + "-memory.png", "peak_mem_mb", "peak memory (MB)",
                              lambda r: r["mode"] != "backward")
    notes = []
    for path, what in ((time_path, "time plot"), (memory_path, "memory plot")):
        notes.append(os.path.basename(path) if path else
                     f"{what} not drawn (no series with two or more sizes and nonzero values)")
    return tuple(p for p in (time_path, memory_path) if p), ", ".join(notes)


def _panel_plot(plt, rows, path, key, ylabel, keep) -> Optional[str]:
    from matplotlib.ticker import NullFormatter

    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        # Log axes: zero (below the memory method's resolution) cannot be drawn.
        if keep(r) and r.get(key) is not None and r[key] > 0:
            series = r["backend"] + (f" {r['variant']}" if r["variant"] else "") + f" {r['dtype']}"
            panels[(r["op"], r["mode"])][series].append((r["pairs"] if not r["variant"] else r["n_img"], r[key]))
    # A panel needs a curve: keep those with some series of two or more sizes.
    panels = {key: series for key, series in panels.items()
              if max(len(points) for points in series.values()) >= 2}
    if not panels:
        return None
    # One colour per series in every panel, so a backend reads the same across panels.
    labels = sorted({label for series in panels.values() for label in series})
    colours = {label: f"C{k % 10}" for k, label in enumerate(labels)}
    n = len(panels)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    # Fixed spacing: tight_layout measures every tick label and costs seconds per figure.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, wspace=0.3, hspace=0.45)
    for ax, ((op, mode), series) in zip(axes.flat, sorted(panels.items())):
        is_loss = op.startswith("loss_")
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    color=colours[label])
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Minor-tick labels of short log axes overlap: label the decades only.
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_xlabel("batch B (B x B pairs)" if is_loss else "pairs (n_img x n_cap)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
