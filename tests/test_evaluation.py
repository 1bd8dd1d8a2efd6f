"""Streamed all-pairs evaluation: streamed == one-shot, top-k == sorting the full matrix,
atomic output files, clear errors for bad inputs."""
import os

import numpy as np
import pytest
import torch

from rcar_fast import data, metrics, reference
from rcar_fast.evaluation import all_pairs, all_pairs_topk, evaluate_protocol, recall_from_topk
from tests.conftest import requires_gpu
from tests.tolerances import (BIT_EQUAL, F32_REFERENCE_VS_F64, F32_SAME_MATH, F32_VS_F64, F64_EVALUATION,
                              assert_close)


def max_dot_similarity(img, cap, lens):
    """A cheap stand-in similarity: mean over real words of the best region dot product."""
    scores = torch.einsum("ird,jld->ijlr", img, cap).amax(-1)          # (n_img, n_cap, L)
    mask = torch.arange(cap.shape[1], device=cap.device)[None, :] < lens[:, None]
    return scores.masked_fill(~mask, 0.0).sum(-1) / lens   # padding never used


def quantised_similarity(img, cap, lens):
    """Like max_dot_similarity but rounded to a coarse grid: many exact ties."""
    return torch.round(max_dot_similarity(img, cap, lens) * 4) / 4


@pytest.fixture(scope="module")
def small_set():
    return data.synthetic(n_images=23, regions=5, dim=16, min_len=2, max_len=9, seed=3,
                          dtype=torch.float64)


def with_nan_padding(ds):
    cap = ds.cap.clone()
    cap[torch.arange(cap.shape[1])[None, :] >= ds.lens[:, None]] = float("nan")
    return cap


@pytest.mark.parametrize("img_block,cap_block,sort_captions", [
    (1, 1, True), (4, 7, True), (5, 11, False), (100, 1000, True)])
def test_streamed_equals_one_shot(small_set, img_block, cap_block, sort_captions):
    img, lens = small_set.img, small_set.lens
    cap = with_nan_padding(small_set)      # padding must never be read
    expected = max_dot_similarity(img, small_set.cap, lens)
    got = all_pairs(img, cap, lens, max_dot_similarity, img_block=img_block,
                    cap_block=cap_block, sort_captions=sort_captions, progress=False)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert_close(got, expected, F64_EVALUATION)


def test_streamed_scan_reference_equals_one_shot_reference():
    ds = data.synthetic(n_images=12, regions=6, dim=24, min_len=3, max_len=10, seed=1)
    expected = reference.scan_similarity_vectorized(ds.img.double(), ds.cap.double(), ds.lens)
    got = all_pairs(ds.img, with_nan_padding(ds), ds.lens, "scan", backend="reference",
                    img_block=5, cap_block=17, progress=False)
    assert got.dtype == torch.float32
    assert_close(got.double(), expected, F32_REFERENCE_VS_F64)


def test_streamed_rcar_head_equals_one_shot():
    torch.manual_seed(0)
    head = reference.RCARHead(embed_dim=16, sim_dim=8, regulator="coop_rcar", steps=2).eval()
    ds = data.synthetic(n_images=6, regions=4, dim=16, min_len=2, max_len=6, seed=2)
    with torch.no_grad():
        expected = head.forward_vectorized(ds.img, ds.cap, ds.lens)
    got = all_pairs(ds.img, ds.cap, ds.lens, head, backend="reference", img_block=4,
                    cap_block=7, progress=False)
    assert_close(got, expected, F32_SAME_MATH)


def test_rcar_head_in_training_mode_is_refused(small_set):
    head = reference.RCARHead(embed_dim=16, sim_dim=8)       # training mode: dropout on
    ds = data.synthetic(n_images=2, regions=3, dim=16, seed=0)
    with pytest.raises(ValueError, match=r"training mode .* call head.eval\(\)"):
        all_pairs(ds.img, ds.cap, ds.lens, head, backend="reference", progress=False)


def test_numpy_memmap_inputs_and_npy_output(small_set, tmp_path):
    np.save(tmp_path / "img.npy", small_set.img.numpy())
    np.save(tmp_path / "cap.npy", small_set.cap.numpy())
    img = np.load(tmp_path / "img.npy", mmap_mode="r")
    cap = np.load(tmp_path / "cap.npy", mmap_mode="r")
    out_path = tmp_path / "sims.npy"
    got = all_pairs(img, cap, small_set.lens.numpy(), max_dot_similarity, img_block=6,
                    cap_block=20, out_path=out_path, progress=False)
    assert isinstance(got, np.memmap) and os.path.exists(out_path)
    assert sorted(os.listdir(tmp_path)) == ["cap.npy", "img.npy", "sims.npy"]  # no leftovers
    expected = max_dot_similarity(small_set.img, small_set.cap, small_set.lens)
    assert_close(np.load(out_path), expected.numpy(), F64_EVALUATION)


def test_fills_a_given_out_tensor(small_set):
    out = torch.full((23, 115), float("nan"), dtype=torch.float32)
    stats = {}
    returned = all_pairs(small_set.img, small_set.cap, small_set.lens, max_dot_similarity,
                         out=out, img_block=8, cap_block=30, progress=False, stats=stats)
    assert returned is out and not torch.isnan(out).any()
    assert stats["pairs"] == 23 * 115 and stats["pairs_per_s"] > 0 and stats["world"] == 1


def lexsorted_topk(matrix: torch.Tensor, k: int):
    """Reference top-k: best first, ties to the lower index (stable sort of -score)."""
    order = torch.sort(-matrix, dim=1, stable=True).indices[:, :k]
    return matrix.gather(1, order), order


@pytest.mark.parametrize("fn", [max_dot_similarity, quantised_similarity])
@pytest.mark.parametrize("k", [1, 5, 200])
def test_topk_equals_sorting_the_full_matrix(small_set, fn, k):
    kwargs = dict(img_block=4, cap_block=9, progress=False)
    full = all_pairs(small_set.img, small_set.cap, small_set.lens, fn, **kwargs)
    if fn is quantised_similarity:
        assert len(torch.unique(full)) < full.numel() // 10      # the tie case is exercised
    top = all_pairs_topk(small_set.img, small_set.cap, small_set.lens, fn, k=k, **kwargs)
    scores, indices = lexsorted_topk(full, min(k, full.shape[1]))
    assert_close(top.i2t_scores, scores, BIT_EQUAL)
    assert torch.equal(top.i2t_indices, indices)
    scores, indices = lexsorted_topk(full.T, min(k, full.shape[0]))
    assert_close(top.t2i_scores, scores, BIT_EQUAL)
    assert torch.equal(top.t2i_indices, indices)


def test_recall_from_topk_matches_recall_metrics_without_ties(small_set):
    full = all_pairs(small_set.img, small_set.cap, small_set.lens, max_dot_similarity,
                     progress=False)
    top = all_pairs_topk(small_set.img, small_set.cap, small_set.lens, max_dot_similarity,
                         k=10, progress=False)
    expected = metrics.recall_metrics(full)
    got = recall_from_topk(top)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert got[key] == pytest.approx(expected[key])


def failing_after(n_calls):
    calls = []

    def fn(img, cap, lens):
        calls.append(1)
        if len(calls) > n_calls:
            raise RuntimeError("backend exploded")
        return max_dot_similarity(img, cap, lens)

    return fn


def test_failure_midway_leaves_no_file(small_set, tmp_path):
    out_path = tmp_path / "sims.npy"
    with pytest.raises(RuntimeError, match="backend exploded"):
        all_pairs(small_set.img, small_set.cap, small_set.lens, failing_after(3), img_block=4,
                  cap_block=9, out_path=out_path, progress=False)
    assert os.listdir(tmp_path) == []
    # An existing result is not clobbered by a failed run either.
    np.save(out_path, np.zeros(3))
    with pytest.raises(RuntimeError, match="backend exploded"):
        all_pairs(small_set.img, small_set.cap, small_set.lens, failing_after(2), img_block=4,
                  out_path=out_path, progress=False)
    assert os.listdir(tmp_path) == ["sims.npy"] and np.load(out_path).shape == (3,)


def wrong_shape(img, cap, lens):
    return torch.zeros(img.shape[0], cap.shape[0] + 1)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(lens=a["lens"] + 100), ValueError, r"lens must lie in \[1, Lmax"),
    (lambda a: a.update(lens=a["lens"][:-1]), ValueError, r"lens must have shape \(n_cap,\) = \(115,\)"),
    (lambda a: a.update(lens=a["lens"].double()), TypeError, r"lens must be an integer tensor"),
    (lambda a: a.update(cap=a["cap"][..., :-1]), ValueError, "share the feature size d"),
    (lambda a: a.update(img=a["img"][0]), ValueError, r"img must have a non-empty shape"),
    (lambda a: a.update(img=[1, 2]), TypeError, "img must be a torch.Tensor or numpy array"),
    (lambda a: a.update(img_block=0), ValueError, "img_block must be a positive integer"),
    (lambda a: a.update(similarity=wrong_shape), RuntimeError, r"expected \("),
    (lambda a: a.update(similarity="bogus"), ValueError, "similarity must be 'scan'"),
    (lambda a: a.update(similarity=3), TypeError, "similarity must be 'scan'"),
])
def test_bad_inputs_raise_and_write_nothing(small_set, tmp_path, mutate, error, match):
    args = dict(img=small_set.img, cap=small_set.cap, lens=small_set.lens,
                similarity=max_dot_similarity, img_block=8)
    mutate(args)
    with pytest.raises(error, match=match):
        all_pairs(args.pop("img"), args.pop("cap"), args.pop("lens"), args.pop("similarity"),
                  out_path=tmp_path / "sims.npy", progress=False, **args)
    assert os.listdir(tmp_path) == []


def non_finite_for_first_caption(value):
    def fn(img, cap, lens):
        scores = max_dot_similarity(img, cap, lens)
        scores[:, 0] = value
        return scores
    return fn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("topk", [False, True])
def test_non_finite_scores_are_an_error_not_a_silent_ranking(small_set, tmp_path, topk, value):
    args = (small_set.img, small_set.cap, small_set.lens, non_finite_for_first_caption(value))
    with pytest.raises(RuntimeError, match=r"returned NaN or \+-Inf for 138 pairs"):
        if topk:
            all_pairs_topk(*args, k=3, cap_block=20, progress=False)
        else:
            all_pairs(*args, cap_block=20, out_path=tmp_path / "s.npy", progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_out_and_missing_directory(small_set, tmp_path):
    args = (small_set.img, small_set.cap, small_set.lens, max_dot_similarity)
    with pytest.raises(ValueError, match=r"out must have shape \(n_img, n_cap\) = \(23, 115\)"):
        all_pairs(*args, out=torch.empty(23, 114), progress=False)
    with pytest.raises(ValueError, match="either out or out_path"):
        all_pairs(*args, out=torch.empty(23, 115), out_path=tmp_path / "x.npy", progress=False)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        all_pairs(*args, out_path=tmp_path / "missing" / "x.npy", progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        all_pairs_topk(*args, k=0, progress=False)


def test_evaluate_protocol_checks_the_shape():
    sims = torch.randn(10, 50)
    with pytest.raises(ValueError, match="expects 5000 images and 25000 captions"):
        evaluate_protocol(sims, "coco5k")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_protocol(sims, "coco2k")
    assert evaluate_protocol(sims, "f30k", strict=False) == metrics.recall_metrics(sims)
    assert (evaluate_protocol(sims, "coco1k", strict=False, fold_size=5)
            == metrics.coco1k_metrics(sims, fold_size=5))


@requires_gpu
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gpu_streamed_equals_cpu_reference(backend):
    ds = data.synthetic(n_images=40, regions=36, dim=128, seed=4)
    expected = reference.scan_similarity_vectorized(ds.img.double(), ds.cap.double(), ds.lens)
    got = all_pairs(ds.img, ds.cap, ds.lens, "scan", backend=backend, device="cuda",
                    img_block=16, cap_block=64, progress=False)
    assert got.device.type == "cpu"
    assert_close(got.double(), expected, F32_VS_F64)
    top = all_pairs_topk(ds.img, ds.cap, ds.lens, "scan", k=5, backend=backend, device="cuda",
                         img_block=16, cap_block=64, progress=False)
    assert torch.equal(top.i2t_indices, lexsorted_topk(got, 5)[1])


def test_protocol_all_is_every_image_at_once():
    sims = torch.randn(7, 35)
    assert evaluate_protocol(sims, "all") == metrics.recall_metrics(sims)


class _RunsCode:
    def __reduce__(self):
        return (os.remove, ("/nonexistent/never-called",))


def test_saved_results_round_trip_and_bad_files(tmp_path):
    from rcar_fast.evaluation import load_results, save_results

    sims = torch.randn(4, 20)
    save_results(tmp_path / "pub.npy", sims, "public")
    save_results(tmp_path / "mat.npy", sims, "matrix")
    public = np.load(tmp_path / "pub.npy", allow_pickle=True).tolist()      # as eval_ensemble
    assert public["npts"] == 4 and public["sims"].dtype == np.float64
    for name in ("pub.npy", "mat.npy"):
        np.testing.assert_array_equal(np.asarray(load_results(tmp_path / name), np.float32),
                                      sims.numpy())
    np.save(tmp_path / "evil.npy", {"npts": 4, "sims": _RunsCode()}, allow_pickle=True)
    with pytest.raises(ValueError, match="refusing to load posix.remove|refusing to load"):
        load_results(tmp_path / "evil.npy")
    np.save(tmp_path / "npts.npy", {"npts": 5, "sims": sims.numpy()}, allow_pickle=True)
    with pytest.raises(ValueError, match="npts = 5 but sims has shape"):
        load_results(tmp_path / "npts.npy")
    np.save(tmp_path / "shape.npy", np.zeros((4, 19), np.float32))
    with pytest.raises(ValueError, match=r"expected \(n_img, 5 \* n_img\)"):
        load_results(tmp_path / "shape.npy")
    np.save(tmp_path / "ints.npy", np.zeros((4, 20), np.int64))
    with pytest.raises(ValueError, match="floating"):
        load_results(tmp_path / "ints.npy")
    content = (tmp_path / "mat.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(content[:len(content) // 2])
    with pytest.raises(ValueError, match="cut.npy is not a readable .npy file"):
        load_results(tmp_path / "cut.npy")
    with pytest.raises(ValueError, match="format must be one of"):
        save_results(tmp_path / "x.npy", sims, "csv")
