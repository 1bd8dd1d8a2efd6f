"""The heads / late-interaction benchmark (bench/maxsim.py, `python -m bench --maxsim`) cannot
rot: its tiny plan runs end to end into a temporary folder (seconds), and its baselines (the
naive padded head, the PyLate-style einsum) are checked against the reference."""
import re

import pytest
import torch

import bench.__main__ as bench_main
from bench import device, maxsim, report
from tests.tolerances import BENCH_FP32_ERROR, CSV_DERIVED, CSV_EXTRAPOLATED, TOLERANCES, approx, assert_close

import rcar_fast

_SLUG = device.device_slug(torch.device("cpu"))


@pytest.fixture(scope="module")
def maxsim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_maxsim")
    argv = ["--maxsim", "--tiny", "--out", str(out), "--quiet", "--device", "cpu", "--threads", "1"]
    assert bench_main.main(argv) == 0
    rows = report.read_csv(str(out / f"{_SLUG}.csv"))
    return out, rows


def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def test_every_head_and_mode_is_measured_against_the_baselines(maxsim_run):
    _, rows = maxsim_run
    for op in maxsim.HEADS:
        for mode in maxsim.MODES:
            for backend in ("reference", "reference_loop", maxsim.NAIVE):
                assert len(_ok(rows, op=op, mode=mode, backend=backend)) == 1, (op, mode, backend)
    measured = [r for r in _ok(rows) if r["family"] == "maxsim"]
    for row in measured:
        # Scores (forward) or gradients (backward, train step) against the reference.
        assert float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row
        assert float(row["gflops_per_s"]) == approx(
            float(row["flops"]) / (float(row["median_ms"]) / 1e3) / 1e9, CSV_DERIVED)
        assert row["mem_method"] and row["peak_mem_mb"] != ""
    # The fused backends' forward rows come with a "direct" row (the backend's fn, no wrapper),
    # except where the wrapper normalises (LAPS).
    direct = [r for r in rows if r["variant"] == "direct"]
    fused_here = {b for b, _ in maxsim.head_candidates(_context(), torch.float32)} & set(maxsim.OUR_BACKENDS)
    assert bool(direct) == bool(fused_here)
    for row in direct:
        assert row["backend"] in maxsim.OUR_BACKENDS and row["mode"] == "forward"
        if row["op"] == "head_laps":
            assert row["status"] == "skipped" and "normalises" in row["reason"]
        else:
            assert row["status"] == "ok" and float(row["err_vs_reference"]) < BENCH_FP32_ERROR, row
    # Every backend dispatch registers for "maxsim" and has here gets a row (measured or skipped).
    for backend, _ in maxsim.head_candidates(_context(), torch.float32):
        assert [r for r in rows if r["op"] == "head_mrsw" and r["backend"] == backend]


def _context():
    from bench import suite

    return suite.RunContext(plan=maxsim.tiny_plan(), device=torch.device("cpu"), common={},
                            peak_name="", log=lambda *_: None)


def test_late_interaction_rows_have_the_einsum_and_the_peers(maxsim_run):
    _, rows = maxsim_run
    for sweep in ("coco", "colbert"):
        found = {r["backend"]: r for r in rows if r["op"] == "maxsim" and r["sweep"] == sweep}
        assert found["reference"]["status"] == found[maxsim.EINSUM]["status"] == "ok"
        module, reason = maxsim.peer_module("maxsim_cpu", torch.device("cpu"))
        peer = found["maxsim_cpu"]
        if module is None:
            assert peer["status"] == "skipped" and "pip install maxsim-cpu" in peer["reason"]
        elif peer["status"] == "skipped":  # only when the peer crashed in its probe process
            assert "in a probe process" in peer["reason"], peer
        else:
            assert peer["status"] == "ok" and float(peer["err_vs_reference"]) < BENCH_FP32_ERROR
        for gpu_peer in ("flash_maxsim", "late_interaction_kernels"):
            assert found[gpu_peer]["status"] == "skipped" and "CUDA GPU" in found[gpu_peer]["reason"]


def test_a_peer_that_crashes_costs_its_rows_not_the_run(tmp_path, monkeypatch):
    """A peer killed by a signal in the probe process is reported (signal named), and one that
    works passes the probe."""
    (tmp_path / "segfaulting_peer.py").write_text(
        "import os, signal\n"
        "def maxsim(q, d, q_mask, d_mask):\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    (tmp_path / "working_peer.py").write_text(
        "def maxsim(q, d, q_mask, d_mask):\n"
        "    return (q @ d.transpose(-1, -2)).sum()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setitem(maxsim.PEERS, "segfaulting_peer", ("segfaulting_peer", "segfaulting-peer", False))
    monkeypatch.setitem(maxsim.PEERS, "working_peer", ("working_peer", "working-peer", False))
    q, d = torch.randn(1, 3, 8), torch.randn(2, 5, 8)
    lens = torch.tensor([3]), torch.tensor([5, 4])
    reason = maxsim.peer_crash_reason("segfaulting_peer", q, d, *lens)
    assert reason is not None and "SIGSEGV" in reason and "Lq=3, Ld=5, d=8" in reason
    assert maxsim.peer_crash_reason("working_peer", q, d, *lens) is None


def test_ratios_are_medians_of_the_same_run(maxsim_run):
    _, rows = maxsim_run
    checked = 0
    for row in _ok(rows, family="maxsim"):
        for factor, baseline in re.findall(r"x([0-9.e+-]+) vs (\w+)", row["detail"]):
            (base,) = [r for r in _ok(rows, op=row["op"], mode=row["mode"], sweep=row["sweep"],
                                      n_img=row["n_img"], n_cap=row["n_cap"], backend=baseline)]
            assert float(factor) == approx(float(base["median_ms"]) / float(row["median_ms"]),
                                           CSV_EXTRAPOLATED)
            checked += 1
        reference = _ok(rows, op=row["op"], mode=row["mode"], sweep=row["sweep"], n_img=row["n_img"],
                        n_cap=row["n_cap"], backend="reference")
        assert float(row["speedup_vs_reference"]) == approx(
            float(reference[0]["median_ms"]) / float(row["median_ms"]), CSV_DERIVED)
    assert checked > 0


def test_rates_are_shares_of_the_gemm_measured_in_the_run(maxsim_run):
    _, rows = maxsim_run
    gemm = _ok(rows, op="ceiling_matmul")
    assert {r["variant"] for r in gemm} == {"start", "end"}
    ceiling = max(float(r["gflops_per_s"]) for r in gemm) / 1e3
    for row in _ok(rows, family="maxsim"):
        assert float(row["ceiling_tflops"]) == approx(ceiling, CSV_DERIVED)
        assert float(row["pct_ceiling"]) == approx(
            100.0 * float(row["gflops_per_s"]) / 1e3 / ceiling, CSV_DERIVED)


def test_summary_has_the_targets_and_leaves_the_suite_summary_alone(maxsim_run):
    out, _ = maxsim_run
    summary = (out / f"{_SLUG}.maxsim.md").read_text()
    assert "## MaxSim targets (issue 14)" in summary and "fp32 GEMM rate, start of the run" in summary
    assert not (out / f"{_SLUG}.md").exists()


def _ragged(n_img, n_cap, R, L, d, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (n_cap,), generator=gen)
    img = torch.randn(n_img, R, d, generator=gen)
    cap = torch.randn(n_cap, L, d, generator=gen)
    cap[torch.arange(L)[None, :] >= lens[:, None]] = 0.0    # the baselines' padding: zeros
    return img, cap, lens


@pytest.mark.parametrize("head", sorted(maxsim.HEADS))
def test_naive_padded_head_is_the_head(head):
    img, cap, lens = _ragged(5, 7, 4, 6, 8, seed=3)
    settings = maxsim.HEADS[head]
    got = maxsim.naive_padded_head(img, cap, lens, chunk_bytes=200, **settings)   # several chunks
    want = rcar_fast.max_similarity(img.double(), cap.double(), lens, backend="reference", **settings)
    assert_close(got.double(), want, TOLERANCES[torch.float32], what=head)


def test_einsum_maxsim_is_maxsim_with_ragged_queries_and_documents():
    docs, queries, q_lens = _ragged(6, 5, 7, 4, 8, seed=4)
    d_lens = torch.tensor([7, 1, 3, 7, 5, 2])
    docs[torch.arange(7)[None, :] >= d_lens[:, None]] = 0.0
    got = maxsim.einsum_maxsim(queries, docs, q_lens, d_lens, chunk_bytes=300)     # several chunks
    want = rcar_fast.maxsim(queries.double(), docs.double(), q_lens, d_lens, backend="reference")
    assert_close(got.double(), want, TOLERANCES[torch.float32], what="einsum maxsim")


def test_maxsim_and_gpu_check_together_is_a_usage_error():
    assert bench_main.main(["--maxsim", "--gpu-check", "--out", "/nonexistent/x"]) == 2
