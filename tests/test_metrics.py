"""Retrieval metrics: hand-made matrices with known ranks (ties included), agreement with the
public SCAN/RCAR loop on tie-free matrices, the 1K 5-fold protocol, the ensemble."""
import numpy as np
import pytest
import torch

from rcar_fast import metrics
from rcar_fast.metrics import (METRIC_KEYS, coco1k_metrics, ensemble, format_metrics_table,
                               recall_metrics, retrieval_ranks)
from tests.tolerances import ENSEMBLE_MEAN, METRICS, assert_close


def public_loop_ranks(sims: np.ndarray, k: int = 5):
    """The public code's i2t / t2i rank loops (argsort per query), for tie-free matrices."""
    n_img = sims.shape[0]
    i2t = np.zeros(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(k * i, k * i + k))
    t2i = np.zeros(k * n_img, dtype=np.int64)
    for j in range(k * n_img):
        order = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(order == j // k)[0][0]
    return i2t, t2i


def public_summary(ranks):
    return [100.0 * np.mean(ranks < 1), 100.0 * np.mean(ranks < 5), 100.0 * np.mean(ranks < 10),
            np.floor(np.median(ranks)) + 1, ranks.mean() + 1]


def test_hand_made_matrix_known_ranks():
    # 3 images, 2 captions each: caption 2i, 2i+1 belong to image i.
    sims = np.array([
        # c0   c1   c2   c3   c4   c5
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],   # image 0: best own caption c0 (0.9) is first -> 0
        [0.8, 0.7, 0.6, 0.4, 0.1, 0.0],   # image 1: best own c2 (0.6); c0, c1 above -> 2
        [0.2, 0.3, 0.4, 0.5, 0.35, 0.1],  # image 2: best own c4 (0.35); c2, c3 above -> 2
    ], dtype=np.float32)
    i2t, t2i = retrieval_ranks(sims, captions_per_image=2)
    np.testing.assert_array_equal(i2t, [0, 2, 2])
    # t2i: c0 (img0 0.9: first) 0; c1 (img0 0.1 < 0.7, 0.3) 2; c2 (img1 0.6 > 0.5, 0.4) 0;
    # c3 (img1 0.4 < 0.5 of img2) 1; c4 (img2 0.35 > 0.3, 0.1) 0; c5 (img2 0.1 > 0.0, 0.0) 0.
    np.testing.assert_array_equal(t2i, [0, 2, 0, 1, 0, 0])
    m = recall_metrics(sims, captions_per_image=2)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == pytest.approx(400 / 6)
    assert m["i2t_medr"] == 3.0          # median 2 -> floor(2) + 1
    assert m["i2t_meanr"] == pytest.approx(4 / 3 + 1)
    assert m["t2i_medr"] == 1.0          # ranks sorted 0 0 0 0 1 2: median 0
    assert m["t2i_meanr"] == pytest.approx(0.5 + 1)
    assert m["rsum"] == pytest.approx(m["i2t_r1"] + m["i2t_r5"] + m["i2t_r10"]
                                      + m["t2i_r1"] + m["t2i_r5"] + m["t2i_r10"])


def test_ties_count_against_the_ground_truth():
    sims = np.array([
        [0.5, 0.5, 0.5, 0.1],   # image 0: own c0, c1 tie with each other (no penalty), c2 ties -> 1
        [0.5, 0.2, 0.3, 0.3],   # image 1: own best 0.3 (c2 = c3 tie, no penalty); c0 above -> 1
    ], dtype=np.float32)
    i2t, t2i = retrieval_ranks(sims, captions_per_image=2)
    np.testing.assert_array_equal(i2t, [1, 1])
    # c0: own image 0 scores 0.5, image 1 ties -> 1. c1: 0.5 vs 0.2 -> 0. c2: own 0.3 vs 0.5 -> 1.
    # c3: own 0.3 vs 0.1 -> 0.
    np.testing.assert_array_equal(t2i, [1, 0, 1, 0])


def test_constant_matrix_gets_worst_ranks_not_perfect_ones():
    sims = torch.full((12, 60), 0.25)
    i2t, t2i = retrieval_ranks(sims)
    np.testing.assert_array_equal(i2t, np.full(12, 55))   # every other caption ties
    np.testing.assert_array_equal(t2i, np.full(60, 11))   # every other image ties
    m = recall_metrics(sims)
    assert m["rsum"] == 0.0 and m["i2t_medr"] == 56.0 and m["t2i_meanr"] == 12.0


def test_median_rank_is_floored_for_even_counts():
    # 2 images with i2t ranks 0 and 3 -> median 1.5 -> floor 1 -> medr 2.
    sims = np.zeros((2, 10), dtype=np.float32)
    sims[0, 0] = 1.0
    sims[1, [0, 1, 2]] = 2.0      # three of image 0's captions above image 1's best
    sims[1, 5] = 1.0
    i2t, _ = retrieval_ranks(sims)
    np.testing.assert_array_equal(i2t, [0, 3])
    assert recall_metrics(sims)["i2t_medr"] == 2.0


@pytest.mark.parametrize("n_img,k", [(7, 5), (30, 5), (12, 3), (5, 1)])
def test_matches_public_loop_on_tie_free_matrices(n_img, k):
    rng = np.random.default_rng(n_img * 10 + k)
    sims = rng.standard_normal((n_img, k * n_img)).astype(np.float64)
    sims[np.arange(k * n_img) // k, np.arange(k * n_img)] += 1.0   # make recall non-trivial
    i2t_ref, t2i_ref = public_loop_ranks(sims, k)
    i2t, t2i = retrieval_ranks(sims, k)
    np.testing.assert_array_equal(i2t, i2t_ref)
    np.testing.assert_array_equal(t2i, t2i_ref)
    m = recall_metrics(sims, k)
    assert_close([m[f"i2t_{s}"] for s in ("r1", "r5", "r10", "medr", "meanr")], public_summary(i2t_ref),
                 METRICS, check_dtype=False)
    assert_close([m[f"t2i_{s}"] for s in ("r1", "r5", "r10", "medr", "meanr")], public_summary(t2i_ref),
                 METRICS, check_dtype=False)


def test_input_kinds_agree(tmp_path):
    rng = np.random.default_rng(1)
    sims = rng.random((25, 125)).astype(np.float32)
    expected = recall_metrics(sims)
    assert recall_metrics(torch.from_numpy(sims)) == expected
    assert recall_metrics(torch.from_numpy(sims).double()) == expected
    path = tmp_path / "sims.npy"
    np.save(path, sims)
    assert recall_metrics(np.load(path, mmap_mode="r")) == expected
    # float16 rounding may create ties, so compare against the float16 values themselves.
    half = sims.astype(np.float16)
    assert recall_metrics(torch.from_numpy(half)) == recall_metrics(half.astype(np.float32))
    assert set(expected) == set(METRIC_KEYS) and all(type(v) is float for v in expected.values())


def test_row_blocking_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(2)
    sims = rng.random((40, 200)).astype(np.float32)
    sims[3, :] = 0.5        # some ties too
    expected = retrieval_ranks(sims)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * 200 + 7)   # 3 rows per block
    got = retrieval_ranks(sims)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("bad,error,match", [
    (np.zeros((3, 14)), ValueError, r"\(n_img, 5 \* n_img\)"),
    (np.zeros((3, 15, 1)), ValueError, "2-D"),
    (np.zeros((0, 0)), ValueError, "n_img >= 1"),
    ([[1.0] * 5], TypeError, "torch.Tensor or numpy array"),
    (torch.zeros(2, 10, dtype=torch.bool), TypeError, "real numbers"),
])
def test_bad_inputs_raise_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        recall_metrics(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_is_rejected_with_its_position(value, as_tensor):
    sims = np.zeros((4, 20), dtype=np.float32)
    sims[2, 7] = value
    with pytest.raises(ValueError, match=r"NaN or \+-Inf \(first at \[2, 7\]"):
        recall_metrics(torch.from_numpy(sims) if as_tensor else sims)


def test_coco1k_averages_the_diagonal_folds():
    rng = np.random.default_rng(3)
    n_folds, fold = 5, 8
    sims = rng.random((n_folds * fold, 5 * n_folds * fold)).astype(np.float32)
    sims[np.arange(sims.shape[1]) // 5, np.arange(sims.shape[1])] += 0.3
    mean, folds = coco1k_metrics(sims, fold_size=fold, return_folds=True)
    assert len(folds) == n_folds
    for f, got in enumerate(folds):
        block = sims[f * fold:(f + 1) * fold, 5 * f * fold:5 * (f + 1) * fold]
        assert got == recall_metrics(block)
    for key in METRIC_KEYS:
        assert mean[key] == pytest.approx(np.mean([m[key] for m in folds]))
    # Off-diagonal blocks are not part of the protocol: making them huge changes nothing.
    poisoned = sims.copy()
    for f in range(n_folds):
        poisoned[f * fold:(f + 1) * fold, :5 * f * fold] = 100.0
    assert coco1k_metrics(poisoned, fold_size=fold) == mean
    assert coco1k_metrics(sims, fold_size=fold) != recall_metrics(sims)


def test_coco1k_rejects_sizes_that_are_not_whole_folds():
    with pytest.raises(ValueError, match="multiple of fold_size=1000"):
        coco1k_metrics(np.zeros((1500, 7500), dtype=np.float32))


def test_ensemble_is_the_average_and_keeps_the_container():
    rng = np.random.default_rng(4)
    a = rng.random((6, 30)).astype(np.float32)
    b = rng.random((6, 30)).astype(np.float32)
    out = ensemble(a, b)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_close(out, (a.astype(np.float64) + b) / 2, ENSEMBLE_MEAN, check_dtype=False)
    out_t = ensemble(torch.from_numpy(a), torch.from_numpy(b).double())
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    assert_close(out_t.numpy(), (a.astype(np.float64) + b) / 2, ENSEMBLE_MEAN)
    with pytest.raises(ValueError, match="same shape"):
        ensemble(a, b[:, :25])


def test_ensemble_of_several_is_the_public_stacked_mean():
    rng = np.random.default_rng(5)
    mats = [rng.standard_normal((4, 20)) for _ in range(3)]
    # eval_ensemble: np.array(all_sims).mean(axis=0) of float64 matrices.
    np.testing.assert_array_equal(ensemble(*mats), np.array(mats).mean(axis=0))
    with pytest.raises(ValueError, match="at least two"):
        ensemble(mats[0])


def test_format_table_lists_every_row():
    m = recall_metrics(np.eye(4, 20, dtype=np.float32))
    table = format_metrics_table({"model A": m, "ensemble": m})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("model A") and "rsum" in lines[0]
    assert f"{m['rsum']:.1f}" in lines[2]
