"""The benchmark suite (bench/) cannot rot: its tiny mode runs here end to end into a temporary
folder, and its measuring parts (FLOP models, peak table, memory method, CSV) are checked."""
import csv
import json
import os
import sys

import pytest
import torch

import bench.__main__ as bench_main
from bench import cases, device, flops, measure, report
from rcar_fast import dispatch


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
        assert float(row["gflops_per_s"]) == pytest.approx(
            float(row["flops"]) / (float(row["median_ms"]) / 1e3) / 1e9, rel=1e-4)
        assert row["mem_method"] and row["peak_mem_mb"] != ""
    compiled = [r for r in rows if r["backend"] == "reference_compile"]
    assert compiled and all(r["status"] == "skipped" and "torch.compile" in r["reason"] for r in compiled)


def test_tiny_run_speedups_are_ratios_within_the_run(tiny_run):
    _, _, rows = tiny_run
    for row in _ok(rows, op="scan_t2i"):
        key = (row["mode"], row["n_img"], row["n_cap"])
        loop = next(r for r in _ok(rows, op="scan_t2i", backend="reference_loop")
                    if (r["mode"], r["n_img"], r["n_cap"]) == key)
        assert float(row["speedup_vs_reference_loop"]) == pytest.approx(
            float(loop["median_ms"]) / float(row["median_ms"]), rel=1e-4)
    for row in _ok(rows, backend="reference"):
        assert float(row["speedup_vs_reference"]) == pytest.approx(1.0)


def test_tiny_run_checks_results_against_the_reference(tiny_run):
    _, _, rows = tiny_run
    # Scores (forward) and gradients (backward, train_step, loss rows) are all checked.
    measured = _ok(rows)
    assert {r["mode"] for r in measured} == set(cases.MODES)
    for row in measured:
        assert row["err_vs_reference"] != "", row
        assert float(row["err_vs_reference"]) < 1e-4, row


def test_tiny_run_compares_sparse_and_full_loss(tiny_run):
    _, _, rows = tiny_run
    for case in cases.tiny_plan().loss_cases:
        op = f"loss_{case.op.name}"
        sparse = _ok(rows, op=op, variant="sparse", backend="reference")
        full = _ok(rows, op=op, variant="full", backend="reference")
        assert len(sparse) == len(full) == len(case.shapes)
        assert float(sparse[0]["speedup_vs_full"]) == pytest.approx(
            float(full[0]["median_ms"]) / float(sparse[0]["median_ms"]), rel=1e-4)
        # The pair recompute runs where backend="auto" sends it (the fused CPU kernels for SCAN).
        pairs_op = "scan_pairs" if case.op.name.startswith("scan") else "rcar_pairs"
        expected = dispatch.choose(pairs_op, "auto", torch.device("cpu"), torch.float32).backend
        assert f"pairs: {expected}" in sparse[0]["detail"]
        # Same loss value either way.
        assert float(sparse[0]["err_vs_reference"]) < 1e-5


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
    assert total == pytest.approx(2 * 100 * 500 * 12 * 36 * 1024, rel=0.1)
    assert flops.scan_forward(100, lens, 36, 1024, "t2i") != flops.scan_forward(100, lens, 36, 1024, "i2t")


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
