"""Writing results: the CSV (appended, one per device), the run's facts (JSON lines), a
Markdown summary and plots of the latest run, all in the results folder:

    <slug>.csv          every row of every run (run_id tells runs apart)
    <slug>.runs.jsonl   one line per run: device facts at start and end, versions, plan
    <slug>.md           summary of the latest run: facts, backends, headline ratios, tables
    <slug>-time.png     median time vs pairs per backend, one panel per (op, mode)
    <slug>-memory.png   peak memory vs pairs (ops) and vs batch (sparse vs full loss)
    <slug>-gpu-check.png  GPU check: time per backend at the COCO 5K shape (log scale)

A schema that only adds columns rewrites an older file in place under the new header (old
rows get empty cells); any other change of schema moves the old file aside.
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
    # Added with the GPU check (bench/gpu_check.py); older files are upgraded in place.
    "lengths", "autotune", "extrapolated", "gbytes_per_s", "ceiling_tflops", "pct_ceiling",
    "floor_tflops", "floor_ms", "pct_floor",
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
    """Appends rows to path (header written for a new file). A file whose header is a subset
    of COLUMNS (an older schema that lacked some columns) is first rewritten under the new
    header; one with other columns is moved aside to <path>.<n>.old, never mixed."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != COLUMNS:
            if set(header) <= set(COLUMNS):
                _rewrite_under_new_header(path)
            else:
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


def _rewrite_under_new_header(path: str) -> None:
    old_rows = read_csv(path)
    tmp = path + ".partial"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in old_rows:
                writer.writerow([row.get(col, "") for col in COLUMNS])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> str:
    """Writes a file under a temporary name and renames it: no half-written summary."""
    tmp = path + ".partial"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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
    if any(r.get("sweep") in ("coco5k", "ceiling") for r in rows):
        out += ["", "## GPU check", "", gpu_check_notes(facts), "", "```",
                gpu_check_table(rows, facts), "```"]
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
        if r["status"] == "ok" and r.get("family") != "ceiling":
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
# GPU check summary
# ---------------------------------------------------------------------------------------------

def gpu_check_notes(facts: dict) -> str:
    ceilings = facts.get("ceilings") or {}
    return (f"Ceilings measured in this run: matmul {ceilings.get('matmul', '')} "
            f"{_fmt(ceilings.get('matmul_tflops'), '.4g', 'n/a')} TFLOP/s, device copy "
            f"{_fmt(ceilings.get('copy_gbs'), '.4g', 'n/a')} GB/s; the all_pairs rows include "
            f"returning the matrix to the host ({_fmt(ceilings.get('result_to_host_ms'), '.3g', 'n/a')} "
            "ms for the full one). Autotune: "
            f"{facts.get('autotune', '')}. Caption lengths: {facts.get('caption_lengths', '')}. "
            "Rows marked * are extrapolated per pair to the full shape from a smaller one "
            "(the `extrapolated` column says from what). %ceil: of the measured matmul; "
            "%floor: the bf16 floor (model FLOPs at the bf16 dense peak) / time.")


def gpu_check_table(rows: list, facts: Optional[dict] = None) -> str:
    """The short fixed-width table the GPU check prints last: one line per row (ceilings in
    the first line), skipped and failed rows with their reason in the note."""
    header = ("case", "dtype", "backend", "ms", "TFLOP/s", "%ceil", "%floor", "peak MiB",
              "vs ref", "vs loop", "err", "note")
    lines = []
    for r in rows:
        if r.get("family") == "ceiling":
            continue
        case = r["op"] + (f"/{r['variant']}" if r.get("variant") else "")
        if r.get("mode", "forward") != "forward" and not r["op"].startswith("loss_"):
            case += f" {r['mode']}"
        case += f" {r['n_img']}x{r['n_cap']}" + ("*" if r.get("extrapolated") else "")
        if r["status"] != "ok":
            note = f"{r['status']}: {str(r.get('reason') or '').removeprefix('skipped: ')}"
            lines.append((case, r["dtype"], r["backend"]) + ("",) * 8 + (note[:90],))
            continue
        tflops = r["gflops_per_s"] / 1e3 if r.get("gflops_per_s") is not None else None
        note = str(r.get("extrapolated") or "").split(" (")[0]
        lines.append((case, r["dtype"], r["backend"], _fmt(r.get("median_ms"), ".4g"),
                      _fmt(tflops, ".3g"), _fmt(r.get("pct_ceiling"), ".1f"),
                      _fmt(r.get("pct_floor"), ".1f"), _fmt(r.get("peak_mem_mb"), ".4g"),
                      _fmt(r.get("speedup_vs_reference"), ".3g"),
                      _fmt(r.get("speedup_vs_reference_loop"), ".3g"),
                      _fmt(r.get("err_vs_reference"), ".1e"), note))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    text = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
            for line in [header] + lines]
    if facts is not None:
        ceilings = facts.get("ceilings") or {}
        text.insert(0, f"GPU check on {facts.get('device_name', '')}: matmul ceiling "
                       f"{_fmt(ceilings.get('matmul_tflops'), '.4g', 'n/a')} TFLOP/s "
                       f"({ceilings.get('matmul', '')}), copy "
                       f"{_fmt(ceilings.get('copy_gbs'), '.4g', 'n/a')} GB/s, autotune "
                       f"{facts.get('autotune', '')}; * = extrapolated per pair (note: from what)")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# Plots

# ---------------------------------------------------------------------------------------------

def plots(rows: list, stem: str) -> tuple:
    """Writes <stem>-time.png and <stem>-memory.png (sweeps), <stem>-gpu-check.png (COCO 5K
    rows); returns (paths, note). Without matplotlib returns ((), the reason)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (), "not drawn: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok" and r["sweep"] in ("pairs", "batch")]
    coco = [r for r in rows if r["status"] == "ok" and r["sweep"] == "coco5k"]
    if not ok and not coco:
        return (), "not drawn: no measured rows"
    paths, notes = [], []
    if ok:
        time_path = _panel_plot(plt, ok, stem + "-time.png", "median_ms", "median time (ms)",
                                lambda r: not r["variant"])
        memory_path = _panel_plot(plt, ok, stem + "-memory.png", "peak_mem_mb", "peak memory (MB)",
                                  lambda r: r["mode"] != "backward")
        for path, what in ((time_path, "time plot"), (memory_path, "memory plot")):
            notes.append(os.path.basename(path) if path else
                         f"{what} not drawn (no series with two or more sizes and nonzero values)")
            if path:
                paths.append(path)
    if coco:
        paths.append(_bar_plot(plt, coco, stem + "-gpu-check.png"))
        notes.append(os.path.basename(paths[-1]))
    return tuple(paths), ", ".join(notes)


def _bar_plot(plt, rows, path) -> str:
    """Horizontal bars: time at the COCO 5K shape per (op, dtype, backend), log scale."""
    rows = sorted(rows, key=lambda r: (r["op"], r["dtype"], r["median_ms"]))
    labels = [f"{r['op']} {r['dtype']} {r['backend']}" + (" *" if r.get("extrapolated") else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    colours = {b: f"C{k}" for k, b in enumerate(sorted({r["backend"] for r in rows}))}
    ax.barh(range(len(rows)), [r["median_ms"] / 1e3 for r in rows],
            color=[colours[r["backend"]] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds for the full matrix (* = extrapolated per pair)")
    n_img, n_cap = rows[0]["n_img"], rows[0]["n_cap"]
    ax.set_title(f"all_pairs at {n_img} x {n_cap}", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.subplots_adjust(left=0.38, right=0.97, bottom=0.6 / (0.28 * len(rows) + 1.2) + 0.05, top=0.93)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
