"""scripts/gpu_check.sh --dry-run: the GPU machine's check, rehearsed on the CPU so that it
cannot rot between the rare GPU windows. Runs the script once (a few minutes on 2 cores) and
reads what it wrote."""
import csv
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from tests.tolerances import BENCH_FP32_ERROR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("facts", "setup", "maxsim", "rcar-bwd-256", "maxsim-tests", "correctness", "coco", "rcar-fwd",
         "gpu-tests", "rcar-bwd-64")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # This interpreter stands in for the set-up's venv (a dry run installs nothing).
    env = dict(os.environ, PYTHON=sys.executable, RCAR_FAST_VENV=str(out / "no-venv"))
    for var in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return run, out


def _summary_rows(out):
    with open(out / "summary.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {row[0]: row for row in rows}


def test_dry_run_passes_every_step_and_prints_the_summary_last(dry_run):
    run, out = dry_run
    rows = _summary_rows(out)
    failed = {name: row for name, row in rows.items() if row[1] != "ok"}
    assert run.returncode == 0 and not failed, (
        f"exit {run.returncode}, failed steps {failed}\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
    assert list(rows) == [*STEPS, "total"]
    tail = run.stdout[run.stdout.rindex("=== gpu_check summary"):]
    for step in STEPS:
        assert step in tail, f"{step} missing from the printed summary:\n{tail}"
    for step in STEPS:
        assert (out / "logs" / f"{step}.log").stat().st_size > 0


def test_dry_run_correctness_cases_ran_and_passed(dry_run):
    _, out = dry_run
    with open(out / "correctness" / "correctness.json") as f:
        report = json.load(f)
    cases = {case["name"]: case for case in report["cases"]}
    assert report["facts"]["dry_run"] is True
    # Triton under the interpreter: fp32 and fp16 of SCAN in both directions and of every RCAR
    # mode ran, each check within its bound; bf16 is refused there, the CUDA cases need a GPU.
    ran = [case for case in cases.values() if case["status"] != "SKIP"]
    assert {c["name"].split("/")[0] for c in ran} == {"scan", "rcar"}
    for name in ("scan/triton/t2i/fp32", "scan/triton/i2t/fp16", "rcar/triton/coop_rcar2/t2i/fp32",
                 "rcar/triton/only_rar1/t2i/fp32", "rcar/triton/only_rcr1/i2t/fp32"):
        case = cases[name]
        assert case["status"] == "PASS", case
        assert case["checks"] and all(c["ok"] and c["err"] <= c["bound"] for c in case["checks"]), case
    assert {c["what"] for c in cases["scan/triton/t2i/fp32"]["checks"]} >= {
        "d img", "d cap (real words)", "d cap (padding)"}
    assert any(c["what"].startswith("poisoned") for c in cases["rcar/triton/coop_rcar2/t2i/fp32"]["checks"])
    assert not [c for c in cases.values() if c["status"] == "FAIL"]
    for name, case in cases.items():
        if "/cuda/" in name:
            assert case["status"] == "SKIP" and "no GPU" in case["reason"], case
        elif name.endswith("/bf16"):
            assert case["status"] == "SKIP" and "interpreter" in case["reason"], case
    assert report["counts"]["PASS"] == len(ran)


def test_dry_run_selected_the_gpu_tests(dry_run):
    _, out = dry_run
    junit = (out / "pytest-gpu.xml").read_text()
    # `-m gpu` on a CPU machine: every selected test is a GPU test, skipped with the reason
    assert 'tests="0"' not in junit and "needs a CUDA GPU" in junit
    assert "<failure" not in junit and "<error" not in junit


def _bench_rows(out):
    (path,) = glob.glob(str(out / "bench" / "*.csv"))
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dry_run_issue_parts_wrote_their_rows(dry_run):
    _, out = dry_run
    rows = _bench_rows(out)
    by = {}
    for row in rows:
        by.setdefault((row["op"], row["sweep"], row["mode"], row["backend"], row["variant"], row["sim_dim"]), row)
    # issue 14: MrSw at the (tiny) COCO shape on triton, checked against the reference; the
    # ColBERT shape against the einsum; the GPU peers and cuda skipped with their reasons.
    for key in (("head_mrsw", "coco5k-mrsw", "forward", "triton", "direct", ""),
                ("head_mrsw", "coco5k-mrsw", "forward", "triton", "", ""),
                ("maxsim", "colbert", "forward", "einsum_pylate", "", ""),
                ("maxsim", "colbert", "forward", "triton", "", "")):
        row = by[key]
        assert row["status"] == "ok" and float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row
        assert float(row["speedup_vs_reference"]) > 0 and row["suite"] == "gpu-check-dry", row
    assert by[("head_mrsw", "coco5k-mrsw", "forward", "reference", "direct", "")]["extrapolated"]
    for peer in ("flash_maxsim", "late_interaction_kernels"):
        row = by[("maxsim", "colbert", "forward", peer, "", "")]
        assert row["status"] == "skipped" and "needs a CUDA GPU" in row["reason"], row
    assert by[("head_mrsw", "coco5k-mrsw", "forward", "cuda", "direct", "")]["status"] == "skipped"
    assert any(r["op"] == "ceiling_matmul" and r["status"] == "ok" for r in rows)
    # issue 15: the fused backward against the reference's autograd at both sim_dims (dry: /16)
    for sim_dim in ("4", "16"):
        row = by[("rcar_coop_rcar2_t2i", "batch", "backward", "triton", "", sim_dim)]
        assert row["status"] == "ok" and float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row
        assert float(row["peak_mem_mb"]) >= 0 and "less peak memory" in row["detail"], row
    assert by[("rcar_coop_rcar2_t2i", "batch", "train_step", "triton", "", "16")]["status"] == "ok"
    assert by[("loss_rcar_coop_rcar2_t2i", "batch", "train_step", "triton", "sparse", "16")]["status"] == "ok"
    # the coco part covers every registered head family (maxsim by its own part)
    assert {"scan_t2i", "scan_i2t", "rcar_coop_rcar2_t2i"} <= {r["op"] for r in rows if r["sweep"] == "coco5k"}
    # issue 15's forward targets: the Triton kernel per GPU tile (the interpreter has one) in
    # both directions, extrapolated to the COCO shape, checked against the float64 reference
    for direction in ("t2i", "i2t"):
        (row,) = [r for r in rows if r["op"] == f"rcar_coop_rcar2_{direction}" and r["sweep"] == "coco5k"
                  and r["variant"].startswith("tile")]
        assert row["status"] == "ok" and float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row
        assert row["variant"] == "tile0 rows16 sw16" and row["extrapolated"] and row["sim_dim"] == "16", row
    summary = _summary_rows(out)
    assert "MrSw coco5k triton" in summary["maxsim"][3] and "backward" in summary["rcar-bwd-256"][3]
    assert "t2i" in summary["rcar-fwd"][3] and "i2t" in summary["rcar-fwd"][3]


def test_dry_run_ran_the_maxsim_tests_first_and_deselected_them_later(dry_run):
    run, out = dry_run
    first = (out / "pytest-maxsim-fp32.xml").read_text()
    assert "every_setting_matches_the_reference_fp32" in first and "needs a CUDA GPU" in first
    assert "vsa" in (out / "pytest-maxsim-vsa.xml").read_text()
    log = (out / "logs" / "gpu-tests.log").read_text()
    assert "[gpu_check] deselected: 0 tests" in log   # skipped ones (no GPU) run again later
    assert "test_gpu_gradients_float32" not in (out / "pytest-gpu.xml").read_text()


def test_a_step_over_the_budget_is_stopped_and_the_rest_reported(tmp_path):
    # A 10-second budget: the steps past it are cut by their timeout or skipped, the script
    # still prints its summary, and its exit status says it did not pass.
    env = dict(os.environ, PYTHON=sys.executable, RCAR_FAST_VENV=str(tmp_path / "no-venv"),
               GPU_CHECK_TOTAL_S="10")
    for var in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    start = time.monotonic()
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    rows = _summary_rows(tmp_path)
    assert list(rows) == [*STEPS, "total"], run.stdout[-3000:]
    assert run.returncode == 1 and rows["total"][1] == "FAILED"
    cut = [name for name, row in rows.items() if row[1] in ("TIMEOUT", "skipped")]
    assert cut and rows["gpu-tests"][1] in ("TIMEOUT", "skipped"), rows
    assert elapsed < 10 + 10 + 15, f"took {elapsed:.0f}s for a 10 s budget (+10 s kill grace)"
    assert "=== gpu_check summary" in run.stdout
