"""scripts/gpu_check.sh --dry-run: the GPU machine's check, rehearsed on the CPU so that it
cannot rot between the rare GPU windows. Runs the script once (about a minute on 2 cores) and
reads what it wrote."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("facts", "setup", "correctness", "bench", "gpu-tests")


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
