"""The rcar-fast command: demo, eval (checkpoint + precomputed split, embeddings, ensemble),
the bench hook, and clear errors."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from rcar_fast import cli, data, evaluation, metrics
from rcar_fast.checkpoint import load_rcar_checkpoint
from tests.test_checkpoint import SIZES, make_official_checkpoint, official_opt
from tests.test_data import write_vocab

FAST = ["--no-progress", "--backend", "reference"]


def test_demo_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--size", "tiny", "--images", "12", "--dim", "16", "--json", str(out),
                   *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pairs/s" in printed and "SCAN t2i [reference]" in printed
    result = json.loads(out.read_text())
    assert result["n_images"] == 12 and result["n_captions"] == 60 and result["dim"] == 16
    assert result["backend"] == "reference"
    (row,) = result["metrics"].values()
    assert set(row) == set(metrics.METRIC_KEYS)
    # The table is the recall of the synthetic set scored by SCAN on that backend.
    ds = data.synthetic(n_images=12, dim=16)
    sims = evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                                progress=False)
    assert row == pytest.approx(metrics.recall_metrics(sims))
    assert result["timing"]["similarity_s"] > 0 and result["pairs_per_s"] > 0


def test_demo_cross_checks_another_backend_against_the_reference(tmp_path):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--size", "tiny", "--images", "6", "--dim", "8", "--json", str(out),
                   "--no-progress", "--backend", "reference_loop", "--reference-pairs", "60"])
    result = json.loads(out.read_text())
    check = result["reference_check"]
    assert rc == 0 and check["ok"] and check["pairs"] <= 60 and check["max_abs_diff"] < 1e-4


def save_split(folder, n_img, seed):
    """A precomputed split (features + caption text) whose words are in the vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "testall_ims.npy",
            rng.standard_normal((n_img, 5, SIZES["img_dim"])).astype(np.float32))
    words = ["a", "dog", "runs", ".", "zebra"]       # "zebra" is not in the vocab: <unk>
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 7))) for _ in range(5 * n_img)]
    (folder / "testall_caps.txt").write_text("\n".join(lines) + "\n")


def expected_sims(checkpoint, folder, vocab_path):
    model = load_rcar_checkpoint(checkpoint)
    split = data.load_precomp(folder, "testall")
    vocab = data.load_vocab(vocab_path)
    img = model.encode_images(split.images)
    cap, lens = model.encode_captions([vocab.encode(c) for c in split.captions])
    with torch.no_grad():
        return model.sim_enc.forward_vectorized(img, cap, lens)


def make_vocab(path):
    words = ("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", ".")
    words += tuple(f"w{i}" for i in range(SIZES["vocab_size"] - len(words)))
    write_vocab(path, words)


def test_eval_checkpoint_on_a_precomputed_split_with_ensemble(tmp_path, capsys):
    split_dir, vocab = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=7, seed=0)
    make_vocab(vocab)
    t2i, i2t = tmp_path / "t2i.pth", tmp_path / "i2t.pth"
    make_official_checkpoint(t2i)
    make_official_checkpoint(i2t, official_opt(attn_type="i2t", i2t_smooth=4.0))
    out, saved = tmp_path / "eval.json", tmp_path / "sims.npy"
    rc = cli.main(["eval", "--checkpoint", str(t2i), "--ensemble", str(i2t), "--data",
                   str(split_dir), "--split", "testall", "--vocab", str(vocab), "--protocol",
                   "f30k", "--any-size", "--save", str(saved), "--json", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    sims_a = expected_sims(t2i, split_dir, vocab)
    sims_b = expected_sims(i2t, split_dir, vocab)
    rows = list(result["metrics"].values())
    assert len(rows) == 3 and "ensemble (ALL)" in result["metrics"]
    assert rows[0] == pytest.approx(metrics.recall_metrics(sims_a))
    assert rows[1] == pytest.approx(metrics.recall_metrics(sims_b))
    ensemble = metrics.ensemble(sims_a, sims_b)
    assert rows[2] == pytest.approx(metrics.recall_metrics(ensemble))
    np.testing.assert_allclose(np.load(saved), ensemble.numpy(), rtol=1e-5, atol=1e-6)
    assert [m["backend"] for m in result["models"]] == ["reference", "reference"]
    assert "model_similarity_s" in result["timing"]


def test_eval_embeddings_with_scan(tmp_path):
    ds = data.synthetic(n_images=10, regions=4, dim=16, seed=1)
    data.save_embeddings(tmp_path / "emb", *ds)
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--embeddings", str(tmp_path / "emb"), "--protocol", "coco1k",
                   "--any-size", "--json", str(out), *FAST])
    assert rc == 0
    (row,) = json.loads(out.read_text())["metrics"].values()
    sims = evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                                progress=False)
    # coco1k on 10 images with --any-size: 5 folds of 2 images.
    assert row == pytest.approx(metrics.coco1k_metrics(sims, fold_size=2))


def test_eval_embeddings_with_a_checkpoint_head(tmp_path):
    ds = data.synthetic(n_images=6, regions=4, dim=SIZES["embed_size"], seed=2)
    data.save_embeddings(tmp_path / "emb", *ds)
    ckpt = tmp_path / "model_best.pth"
    make_official_checkpoint(ckpt)
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--embeddings", str(tmp_path / "emb"), "--checkpoint", str(ckpt),
                   "--protocol", "f30k", "--any-size", "--json", str(out), *FAST])
    assert rc == 0
    result = json.loads(out.read_text())
    (row,) = result["metrics"].values()
    with torch.no_grad():
        sims = load_rcar_checkpoint(ckpt).sim_enc.forward_vectorized(*ds)
    assert row == pytest.approx(metrics.recall_metrics(sims))
    assert result["models"][0]["name"].startswith("RCAR t2i (model_best.pth)")


@pytest.mark.parametrize("argv,match", [
    (["eval"], "eval needs --checkpoint and --data, or --embeddings"),
    (["eval", "--checkpoint", "nope.pth", "--data", "."], "not found"),
    (["eval", "--embeddings", "nowhere"], "embeddings directory not found"),
])
def test_eval_errors_are_reported(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + FAST) == 2
    assert match in capsys.readouterr().err


def test_eval_refuses_a_split_of_the_wrong_size(tmp_path, capsys):
    ds = data.synthetic(n_images=4, regions=2, dim=8, seed=1)
    data.save_embeddings(tmp_path, *ds)
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--protocol", "f30k", *FAST]) == 2
    assert "expects 1000 images" in capsys.readouterr().err
    assert cli.main(["eval", "--embeddings", str(tmp_path), *FAST]) == 2
    assert "cannot infer the protocol from 4 images" in capsys.readouterr().err


def test_bench_hook_delegates(monkeypatch):
    calls = []
    fake_pkg = types.ModuleType("bench")
    fake_main = types.ModuleType("bench.__main__")
    fake_main.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "bench", fake_pkg)
    monkeypatch.setitem(sys.modules, "bench.__main__", fake_main)
    assert cli.main(["bench", "--quick", "scan"]) == 0
    assert calls == [["--quick", "scan"]]


def test_bench_hook_without_bench(monkeypatch, capsys):
    # import bench -> ImportError; bench.__main__ too, which an earlier test may have imported
    # (a cached submodule is found without its parent, and the real suite would run)
    monkeypatch.setitem(sys.modules, "bench", None)
    monkeypatch.setitem(sys.modules, "bench.__main__", None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks are not available" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    printed = capsys.readouterr().out
    assert "demo" in printed and "eval" in printed and "bench" in printed
