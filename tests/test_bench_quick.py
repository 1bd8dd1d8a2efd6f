"""The benchmark suite (bench/) cannot rot: its tiny mode runs here end to end into a temporary
folder, and its measuring parts (FLOP models, peak table, memory method, CSV) are checked."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import bench.__main__ as bench_main
from bench import cases, device, flops, measure, report
from rcar_fast import dispatch
from tests.tolerances import (BENCH_FP32_ERROR, BENCH_LOW_PRECISION_ERROR, BENCH_SPARSE_LOSS_ERROR, CSV_DERIVED,
                              CSV_EXACT_COUNT, CSV_EXTRAPOLATED, F32_SAME_MATH, FLOPS_GEMM_SHARE, UNIT_NORM_BF16, approx,
                              assert_close)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_AUTOTUNE_BEFORE = os.environ.get("RCAR_FAST_AUTOTUNE")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: on a shared 2-core machine, OpenMP threads wait for descheduled cores.
    assert bench_main.main(["--tiny", "--out", str(out), "--quiet", "--device", "cpu", "--threads", "1"]) == 0
    slug = device.device_slug(torch.device("cpu"))
    with open(out / f"{slug}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, slug, rows


def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def test_tiny_run_measures_every_op_mode_and_baseline(tiny_run):
    _, _, rows = tiny_run
    plan = cases.tiny_plan()
    for case in plan.op_cases:
        for mode in case.modes:
            for backend in ("reference", "reference_loop"):
                found = _ok(rows, op=case.op.name, mode=mode, backend=backend)
                assert len(found) == len(case.shapes), (case.op.name, mode, backend)
    for row in _ok(rows):
        assert float(row["median_ms"]) > 0 and float(row["flops"]) > 0
        assert float(row["gflops_per_s"]) == approx(
            float(row["flops"]) / (float(row["median_ms"]) / 1e3) / 1e9, CSV_DERIVED)
        assert row["mem_method"] and row["peak_mem_mb"] != ""
    compiled = [r for r in rows if r["backend"] == "reference_compile"]
    assert compiled and all(r["status"] == "skipped" and "torch.compile" in r["reason"] for r in compiled)


def test_tiny_run_speedups_are_ratios_within_the_run(tiny_run):
    _, _, rows = tiny_run
    for row in _ok(rows, op="scan_t2i"):
        key = (row["mode"], row["n_img"], row["n_cap"])
        loop = next(r for r in _ok(rows, op="scan_t2i", backend="reference_loop")
                    if (r["mode"], r["n_img"], r["n_cap"]) == key)
        assert float(row["speedup_vs_reference_loop"]) == approx(
            float(loop["median_ms"]) / float(row["median_ms"]), CSV_DERIVED)
    for row in _ok(rows, backend="reference"):
        assert float(row["speedup_vs_reference"]) == pytest.approx(1.0)


def test_tiny_run_checks_results_against_the_reference(tiny_run):
    _, _, rows = tiny_run
    # Scores (forward) and gradients (backward, train_step, loss rows) are all checked.
    measured = _ok(rows)
    assert {r["mode"] for r in measured} == set(cases.MODES)
    for row in measured:
        assert row["err_vs_reference"] != "", row
        assert float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row


def test_tiny_run_compares_sparse_and_full_loss(tiny_run):
    _, _, rows = tiny_run
    for case in cases.tiny_plan().loss_cases:
        op = f"loss_{case.op.name}"
        sparse = _ok(rows, op=op, variant="sparse", backend="reference")
        full = _ok(rows, op=op, variant="full", backend="reference")
        assert len(sparse) == len(full) == len(case.shapes)
        assert float(sparse[0]["speedup_vs_full"]) == approx(
            float(full[0]["median_ms"]) / float(sparse[0]["median_ms"]), CSV_DERIVED)
        # The pair recompute runs on the row's backend where the pair op has one: the reference
        # row is the reference throughout (the baseline of the fused rows).
        assert dispatch.implementation(case.op.pairs_op, "reference") is not None
        assert "selection: reference, pairs: reference" in sparse[0]["detail"]
        # Same loss value either way.
        assert float(sparse[0]["err_vs_reference"]) < BENCH_SPARSE_LOSS_ERROR


def test_tiny_run_writes_summary_facts_and_plots(tiny_run):
    out, slug, rows = tiny_run
    summary = (out / f"{slug}.md").read_text()
    for heading in ("## Device", "## Backends", "## Headline", "## Method"):
        assert heading in summary
    assert "cpu_model" in summary and "torch" in summary
    facts = [json.loads(line) for line in (out / f"{slug}.runs.jsonl").read_text().splitlines()]
    assert len(facts) == 1 and facts[0]["rows"] == len(rows)
    assert "cpu_model" in facts[0]["start"] and "cpu_model" in facts[0]["end"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in summary
    else:
        assert (out / f"{slug}-time.png").stat().st_size > 0
        # Tiny tensors sit below the CPU memory method's resolution: no memory curve then.
        assert (out / f"{slug}-memory.png").exists() or "memory plot not drawn" in summary


def test_plots_are_skipped_with_a_note_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    paths, note = report.plots([], str(tmp_path / "x"))
    assert paths == () and "matplotlib is not installed" in note


def test_csv_appends_and_moves_an_old_schema_aside(tmp_path):
    path = str(tmp_path / "dev.csv")
    report.append_csv(path, [{"op": "a", "median_ms": 1.5}])
    report.append_csv(path, [{"op": "b", "median_ms": float("nan")}])
    rows = report.read_csv(path)
    assert [r["op"] for r in rows] == ["a", "b"] and rows[1]["median_ms"] == "nan"
    with open(path, "w") as f:
        f.write("old,header\n1,2\n")
    report.append_csv(path, [{"op": "c"}])
    assert [r["op"] for r in report.read_csv(path)] == ["c"]
    assert os.path.exists(path + ".1.old")


def test_flop_models_match_the_published_numbers():
    # SIMILARITY.md: RCAR coop_rcar 2 steps, d 1024, s 256, L ~ 12, R 36: about 36 MFLOP per
    # pair, about 40x SCAN.
    rcar = flops.rcar_pair(12, 36, 1024, 256, "coop_rcar", 2)
    scan = flops.scan_forward(1, [12], 36, 1024, "t2i") - 2 * 36 * 36 * 1024 - 2 * 12 * 1024
    assert 34e6 < rcar < 38e6
    assert 35 < rcar / scan < 45
    # SCAN over many pairs is dominated by the region-word GEMM: 2 * pairs * L * R * d.
    lens = [12] * 500
    total = flops.scan_forward(100, lens, 36, 1024, "t2i")
    assert total == approx(2 * 100 * 500 * 12 * 36 * 1024, FLOPS_GEMM_SHARE)
    assert flops.scan_forward(100, lens, 36, 1024, "t2i") != flops.scan_forward(100, lens, 36, 1024, "i2t")


def test_gemm_flops_are_the_matrix_products_per_query_row():
    # bench/cpu_quick.py's "useful" FLOPs. SCAN: the region-word GEMM alone, either direction.
    lens = [7, 12, 30]
    for direction in ("t2i", "i2t"):
        assert flops.scan_forward(5, lens, 36, 1024, direction, gemm_only=True) == 2 * 5 * sum(lens) * 36 * 1024
    # RCAR coop_rcar: per query row, steps x (scores + attended context + W), (steps - 1) RCR
    # MLPs and steps RAR keys.
    Q, C, d, s, steps = 12, 36, 1024, 256, 2
    per_row = steps * 2 * (2 * C * d + d * s) + (steps - 1) * 2 * (2 * s * s + 2 * s * d + s * (s // 2) + s // 2) \
        + steps * 2 * s * s
    assert flops.rcar_pair(Q, C, d, s, "coop_rcar", steps, gemm_only=True) == Q * per_row
    assert flops.rcar_forward(3, [Q, Q], C, d, s, "coop_rcar", steps, "t2i", gemm_only=True) == 6 * Q * per_row
    for regulator, n_steps in (("only_rar", 2), ("only_rcr", 2), ("only_rcr", 0), ("coop_rcar", 1)):
        gemm = flops.rcar_pair(Q, C, d, s, regulator, n_steps, gemm_only=True)
        # The matrix products are most of the model's FLOPs, never more than all of them.
        assert 0.8 * flops.rcar_pair(Q, C, d, s, regulator, n_steps) < gemm < flops.rcar_pair(Q, C, d, s, regulator, n_steps)


def test_peak_table_by_nvml_name():
    assert device.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert device.peak_tflops("NVIDIA H100 PCIe", torch.float16) == 756.0
    assert device.peak_tflops("NVIDIA H200", torch.float32) == 66.9
    assert device.peak_tflops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312.0
    assert device.peak_tflops("Intel(R) Xeon(R)", torch.float32) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_a_temporary_allocation():
    measure.configure_cpu_allocator()

    def allocate(mib):
        x = torch.ones(mib * 2**18)         # freed before returning
        return float(x[0])

    for mib in (64, 8):
        allocate(mib)   # a warm-up leaves the block in malloc's heap (as timed calls do)
        memory = measure.peak_memory(lambda mib=mib: allocate(mib), torch.device("cpu"))
        assert memory.method.startswith("rss-hwm")
        assert (mib - 1) * 2**20 < memory.peak_bytes < (mib + 24) * 2**20, (mib, memory)


def test_bad_arguments_are_refused():
    assert bench_main.main(["--tiny", "--modes", "sideways", "--out", "/nonexistent/x"]) == 2
    with pytest.raises(SystemExit):
        bench_main.main(["--tiny", "--full"])


def test_main_leaves_torch_threads_as_it_found_them(tiny_run):
    before = torch.get_num_threads()
    assert bench_main.main(["--tiny", "--threads", "0"]) == 2
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# The GPU check (python -m bench --gpu-check): its dry run on the CPU, into a temporary folder
# ---------------------------------------------------------------------------------------------

def _results_state():
    """(name, size, mtime) of every committed results file: the dry run must not touch them."""
    folder = bench_main.DEFAULT_OUT
    return sorted((name, os.stat(os.path.join(folder, name)).st_size,
                   os.stat(os.path.join(folder, name)).st_mtime_ns) for name in os.listdir(folder))


@pytest.fixture(scope="module")
def gpu_check_dry(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("gpu_check")
    before = _results_state()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # The coco part (bench/gpu_check.py); the issue parts: tests/test_gpu_check.py.
        code = bench_main.main(["--gpu-check", "--part", "coco", "--dry-run", "--out", str(out), "--threads", "1"])
    assert code == 0
    assert _results_state() == before, "the dry run modified bench/results/"
    slug = device.device_slug(torch.device("cpu"))
    with open(out / f"{slug}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        rows = list(reader)
    return out, slug, rows, printed.getvalue()


def _find(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_gpu_check_dry_run_measures_the_ceilings(gpu_check_dry):
    _, _, rows, _ = gpu_check_dry
    (matmul,) = _find(rows, op="ceiling_matmul")
    (copy,) = _find(rows, op="ceiling_copy")
    assert matmul["status"] == copy["status"] == "ok"
    assert float(matmul["gflops_per_s"]) == approx(
        float(matmul["flops"]) / float(matmul["median_ms"]) / 1e6, CSV_DERIVED)
    assert float(matmul["flops"]) == approx(2 * 256 ** 3, CSV_EXACT_COUNT) and float(copy["gbytes_per_s"]) > 0
    (to_host,) = _find(rows, op="result_to_host")
    assert to_host["status"] == "skipped" and "CPU" in to_host["reason"]
    for row in _find(rows, status="ok"):
        if row["family"] != "ceiling":
            assert float(row["ceiling_tflops"]) == approx(float(matmul["gflops_per_s"]) / 1e3, CSV_DERIVED)
            assert float(row["pct_ceiling"]) == approx(
                100 * float(row["gflops_per_s"]) / 1e3 / float(row["ceiling_tflops"]), CSV_DERIVED)
            # No datasheet peak for a CPU: the floor is the measured ceiling (floor_tflops says so).
            assert float(row["pct_floor"]) == approx(
                100 * float(row["floor_ms"]) / float(row["median_ms"]), CSV_DERIVED)


def test_gpu_check_dry_run_has_every_case_with_a_status(gpu_check_dry):
    from rcar_fast import dispatch

    _, _, rows, _ = gpu_check_dry
    triton_reason = dispatch.environment_reason("triton", "cpu")
    for op in ("scan_t2i", "scan_i2t", "rcar_coop_rcar2_t2i"):
        for dtype in ("bfloat16", "float32"):
            found = {r["backend"]: r for r in _find(rows, op=op, dtype=dtype, sweep="coco5k", variant="")}
            direct = {r["backend"]: r for r in _find(rows, op=op, dtype=dtype, sweep="coco5k",
                                                      variant="direct")}
            assert set(direct) == {"triton", "cuda"} and direct["cuda"]["status"] == "skipped"
            assert direct["triton"]["status"] == found["triton"]["status"]
            assert set(found) == {"reference", "reference_loop", "triton", "cuda"}, (op, dtype)
            for row in found.values():
                assert row["n_img"] == "4" and row["n_cap"] == "10" and row["lengths"] == "coco"
                assert row["autotune"] and row["suite"] == "gpu-check-dry"
                assert row["status"] == "ok" or row["reason"], row
            assert found["cuda"]["status"] == "skipped"
            for baseline in ("reference", "reference_loop"):
                row = found[baseline]
                assert row["status"] == "ok" and "per pair from" in row["extrapolated"]
            triton = found["triton"]
            if dtype == "float32" and triton_reason is None:
                assert triton["status"] == "ok", triton
                assert float(triton["err_vs_reference"]) < BENCH_FP32_ERROR
                for row in (triton, direct["triton"]):
                    assert float(row["speedup_vs_reference"]) == approx(
                        float(found["reference"]["median_ms"]) / float(row["median_ms"]), CSV_DERIVED)
            else:
                assert triton["status"] == "skipped" and triton["reason"]
            assert float(found["reference_loop"]["err_vs_reference"]) < (BENCH_FP32_ERROR if dtype == "float32"
                                                                    else BENCH_LOW_PRECISION_ERROR)


def test_gpu_check_dry_run_extrapolates_per_pair(gpu_check_dry):
    import re

    _, _, rows, _ = gpu_check_dry
    extrapolated = [r for r in _find(rows, status="ok") if r["extrapolated"]]
    # The baselines of every op and the fast RCAR rows (measured at 2 x 5, reported at 4 x 10).
    assert any(r["op"].startswith("rcar") and r["backend"] == "triton" for r in extrapolated) or \
        not _find(rows, op="rcar_coop_rcar2_t2i", backend="triton", status="ok")
    for row in extrapolated:
        match = re.match(r"x([0-9.]+) per pair from (\d+)x(\d+) \(measured ([0-9.e+-]+) ms", row["extrapolated"])
        assert match, row["extrapolated"]
        factor, n_img, n_cap, measured = (float(match[1]), int(match[2]), int(match[3]), float(match[4]))
        assert factor == approx(int(row["pairs"]) / (n_img * n_cap), CSV_EXTRAPOLATED)
        assert float(row["median_ms"]) == approx(factor * measured, CSV_EXTRAPOLATED)


def test_gpu_check_dry_run_has_the_training_step(gpu_check_dry):
    _, _, rows, _ = gpu_check_dry
    for op in ("loss_scan_t2i",):   # RCAR's: the rcar-backward part (tests/test_gpu_check.py)
        for variant in ("full", "sparse"):
            (ref,) = _find(rows, op=op, variant=variant, backend="reference")
            assert ref["status"] == "ok" and ref["n_img"] == "4" and ref["mode"] == "train_step"
            assert ref["peak_mem_mb"] != "" and float(ref["speedup_vs_reference"]) == pytest.approx(1.0)


def test_gpu_check_dry_run_prints_the_summary_last_and_writes_the_files(gpu_check_dry):
    out, slug, rows, printed = gpu_check_dry
    lines = printed.rstrip().splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("case "))
    assert lines[header - 1].startswith("GPU check on ")
    assert lines[-1].startswith("coco ") and "all_pairs: " in lines[-1]   # the part's headline, last
    table = lines[header + 1:-1]
    assert len(table) == len([r for r in rows if r["family"] != "ceiling"])
    assert all(line.split()[0] in {r["op"] + ("/" + r["variant"] if r["variant"] else "") for r in rows}
               for line in table)
    summary = (out / f"{slug}.md").read_text()
    assert "## GPU check" in summary and "Caption lengths: coco" in summary
    facts = json.loads((out / f"{slug}.runs.jsonl").read_text().splitlines()[-1])
    assert facts["suite"] == "gpu-check-dry" and facts["ceilings"]["matmul_tflops"] > 0
    assert facts["autotune"] and "Geometric" in facts["caption_lengths"] and facts["git_commit"] is not None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / f"{slug}-gpu-check.png").stat().st_size > 0


def test_gpu_check_usage_errors_are_one_line():
    assert bench_main.main(["--dry-run", "--out", "/nonexistent/x"]) == 2
    assert bench_main.main(["--gpu-check", "--dry-run"]) == 2
    assert bench_main.main(["--gpu-check", "--dry-run", "--max-minutes", "0", "--out", "/nonexistent/x"]) == 2
    if not torch.cuda.is_available():
        assert bench_main.main(["--gpu-check", "--out", "/nonexistent/x"]) == 2


def test_gpu_check_part_choices_are_the_parts_run_check_knows():
    from bench import gpu_check

    (part,) = [a for a in bench_main._parser()._actions if a.dest == "part"]
    assert tuple(part.choices) == ("all",) + gpu_check.PARTS


def test_gpu_check_dry_run_turns_the_interpreter_on_before_triton_loads_or_says_it_cannot(tmp_path):
    # `python -m bench` sets TRITON_INTERPRET=1 before its first import (torch imports triton);
    # a main() called after triton was imported without it refuses in one line, exit 2.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    script = ("import sys, triton, bench.__main__ as m; "
              f"sys.exit(m.main(['--gpu-check', '--part', 'coco', '--dry-run', '--out', {str(tmp_path)!r}]))")
    late = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert late.returncode == 2 and "set TRITON_INTERPRET=1" in late.stderr, late.stderr[-2000:]
    assert len(late.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
    # As `python -m bench --gpu-check --dry-run` (no --out: a usage error, after the module's
    # top ran): the interpreter is on, and was before triton was imported.
    early = ("import os, runpy, sys; sys.argv = ['bench', '--gpu-check', '--dry-run']\n"
             "try:\n    runpy.run_module('bench', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as stop:\n    print(stop.code, os.environ.get('TRITON_INTERPRET'))\n")
    run = subprocess.run([sys.executable, "-c", early], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.stdout.split() == ["2", "1"], (run.stdout, run.stderr[-2000:])


def test_gpu_check_budget_skips_the_remaining_cases(tmp_path):
    from bench import gpu_check, suite

    ctx = suite.RunContext(plan=gpu_check.plan_for(gpu_check.dry_sizes()), device=torch.device("cpu"),
                           common={}, peak_name="", log=lambda *_: None)
    ctx.deadline = 0.0   # already past: every case is skipped with the reason, none raises
    rows = gpu_check.run_check(gpu_check.new_check(ctx, gpu_check.dry_sizes()))
    similarity = [r for r in rows if r["family"] != "ceiling" and not r["op"].startswith("loss_")]
    assert similarity and all(r["status"] == "skipped" and "--max-minutes" in r["reason"] for r in similarity)
    assert all(r["status"] == "skipped" for r in rows)


def test_coco_caption_lengths_look_like_coco():
    lens = cases.caption_lengths(25000, 12, "coco")
    assert lens.dtype == torch.int64 and int(lens.min()) == 8 and int(lens.max()) <= 50
    assert 11.0 < float(lens.float().mean()) < 12.0 and int(lens.median()) == 10
    assert torch.equal(lens, cases.caption_lengths(25000, 12, "coco"))       # seeded
    with pytest.raises(ValueError, match="uniform"):
        cases.caption_lengths(4, 12, "zipf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_made_on_the_device_in_the_dtype(dtype):
    shape = cases.Shape(3, 7, 5, 6, 16, dtype, lengths="coco")
    img, cap, lens = cases.make_inputs(shape, torch.device("cpu"))
    assert img.dtype == cap.dtype == dtype and img.shape == (3, 5, 16)
    assert cap.shape == (7, int(lens.max()), 16) and int(lens.min()) >= 8
    real = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    assert bool((cap[~real] == 0).all())
    norms = cap[real].float().norm(dim=-1)
    assert_close(norms, torch.ones_like(norms), UNIT_NORM_BF16)
    again = cases.make_inputs(shape, torch.device("cpu"))
    assert torch.equal(img, again[0]) and torch.equal(cap, again[1])


def test_full_plan_has_the_coco_5k_rows_and_limits_the_slow_baselines():
    plan = cases.full_plan(torch.device("cpu"))
    coco = [(c.op.name, s) for c in plan.op_cases for s in c.shapes if s.sweep == "coco5k"]
    assert {(name, s.dtype) for name, s in coco} == {
        (n, dt) for n in ("scan_t2i", "scan_i2t") for dt in (torch.bfloat16, torch.float32)}
    assert all(s.n_img == 5000 and s.n_cap == 25000 and s.lengths == "coco" for _, s in coco)
    from bench import suite

    ctx = suite.RunContext(plan=plan, device=torch.device("cpu"), common={}, peak_name="")
    assert suite.baseline_limit_reason(ctx, "reference_loop", 5000 * 25000)
    assert suite.baseline_limit_reason(ctx, "reference_loop", 128 * 640) is None
    assert suite.baseline_limit_reason(ctx, "triton", 5000 * 25000) is None


def test_csv_with_an_older_subset_schema_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "dev.csv")
    old_columns = report.COLUMNS[:10]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(old_columns)
        writer.writerow(["old"] * len(old_columns))
    report.append_csv(path, [{"op": "new", "autotune": "quick"}])
    rows = report.read_csv(path)
    assert [r["run_id"] for r in rows] == ["old", ""] and rows[1]["autotune"] == "quick"
    assert rows[0]["autotune"] == "" and not os.path.exists(path + ".1.old")


def test_a_slow_call_is_measured_once_after_its_warm_up():
    calls = []
    timing, memory = measure.measure_call(lambda: calls.append(1), torch.device("cpu"), budget_s=10.0,
                                          min_repeats=3, max_repeats=5, single_over_s=0.0)
    assert len(calls) == 2 and timing.repeats == 1 and memory.method


def test_a_very_slow_call_is_timed_from_its_warm_up_only():
    calls = []
    timing, memory = measure.measure_call(lambda: calls.append(1), torch.device("cpu"), budget_s=10.0,
                                          min_repeats=3, max_repeats=5, single_over_s=0.0,
                                          warmup_only_over_s=0.0)
    assert len(calls) == 1 and timing.repeats == 0 and timing.median_s == timing.first_s
    assert memory.method and memory.peak_bytes is not None


def test_an_interrupted_gpu_check_keeps_the_rows_measured_so_far(monkeypatch, tmp_path, capsys):
    from bench import gpu_check

    def measure_then_stop(check, *part):
        check.rows.extend(gpu_check.measure_ceilings(check))
        raise KeyboardInterrupt   # what SIGTERM from an outer timeout becomes

    monkeypatch.setattr(gpu_check, "run_check", measure_then_stop)
    assert bench_main.main(["--gpu-check", "--dry-run", "--out", str(tmp_path), "--quiet"]) == 1
    slug = device.device_slug(torch.device("cpu"))
    rows = report.read_csv(str(tmp_path / f"{slug}.csv"))
    assert [r["op"] for r in rows] == ["ceiling_matmul", "ceiling_copy", "result_to_host"]
    facts = json.loads((tmp_path / f"{slug}.runs.jsonl").read_text())
    assert facts["interrupted"] is True and "interrupted" in capsys.readouterr().err


def test_gpu_check_leaves_the_environment_as_it_found_it(gpu_check_dry):
    # The fixture ran main() in this process; the autotune switch it set is gone again.
    assert os.environ.get("RCAR_FAST_AUTOTUNE") == _AUTOTUNE_BEFORE
    _, _, rows, _ = gpu_check_dry
    assert {r["autotune"] for r in rows} == {_AUTOTUNE_BEFORE or "quick"}


def test_compiled_backward_rows_rebuild_the_graph_per_call(monkeypatch):
    # torch.compile's backward reuses its saved buffers: mode_fn's one graph, replayed, fails
    # (or with donation off gives wrong gradients from its second run at realistic sizes). The
    # compiled rows time (forward + backward) - forward with a fresh graph per call.
    # aot_eager: the same autograd wrapping, no code generation. Times are stubbed (the
    # subtraction is what is checked), the gradients are real.
    from bench import suite

    def scores(img, cap, lens):
        return 2.0 * torch.tanh(img.flatten(1) @ cap.flatten(1).T)  # a saved intermediate

    gen = torch.Generator().manual_seed(0)
    img, cap = torch.randn(3, 2, 4, generator=gen), torch.randn(5, 2, 4, generator=gen)
    lens = torch.full((5,), 2)
    compiled = torch.compile(scores, dynamic=True, backend="aot_eager")
    replay, _ = suite.mode_fn("backward", compiled, img, cap, lens, None)
    with pytest.raises(RuntimeError, match="donated buffers"):
        replay()   # what the reference_compile backward rows recorded

    stub_ms = {"forward": 3.0, "forward + backward": 5.0}

    def stub_measure(ctx, row, run, model_flops, dtype, skip_key):
        out = run()
        ms = stub_ms["forward" if skip_key[-1] == "forward" else "forward + backward"]
        row.update(status="ok", median_ms=ms, min_ms=ms, gflops_per_s=None)
        return out

    monkeypatch.setattr(suite, "measure_into", stub_measure)
    ctx = suite.RunContext(plan=cases.tiny_plan(), device=torch.device("cpu"), common={}, peak_name="")
    row = {}
    grads = suite.measure_rebuilt_backward(ctx, row, compiled, img, cap, lens, None, 2e6, torch.float32, ("k",))
    eager, _ = suite.mode_fn("backward", scores, img, cap, lens, None)
    for got, want in zip(grads, eager()):
        assert_close(got, want, F32_SAME_MATH, what="compiled backward")
    assert row["median_ms"] == 2.0 and row["gflops_per_s"] == approx(1.0, CSV_DERIVED)
    assert "(forward + backward) 5 ms - forward 3 ms" in row["detail"]
    stub_ms["forward"] = 6.0   # noise larger than the backward: said, not a negative time
    with pytest.raises(RuntimeError, match="backward time not resolved"):
        suite.measure_rebuilt_backward(ctx, {}, compiled, img, cap, lens, None, 2e6, torch.float32, ("k",))
