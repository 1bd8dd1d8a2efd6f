"""The rcar-fast command: demo, eval (checkpoint + precomputed split, embeddings, ensemble),
the bench hook, and clear errors."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from rcar_fast import cli, data, evaluation, metrics, scorers
from rcar_fast.checkpoint import load_rcar_checkpoint
from tests.test_checkpoint import SIZES, make_official_checkpoint, official_opt
from tests.test_data import write_vocab
from tests.tolerances import F32_ABS, F32_EXACT_FILE, F32_SAME_MATH, assert_close

FAST = ["--no-progress", "--backend", "reference"]


def _has_nltk():
    try:
        import nltk  # noqa: F401
    except ImportError:
        return False
    return True


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
    assert rc == 0 and check["ok"] and check["pairs"] <= 60 and check["max_abs_diff"] < F32_ABS.atol


def save_split(folder, n_img, seed):
    """A precomputed split (features + caption text) whose words are in the vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "testall_ims.npy",
            rng.standard_normal((n_img, 5, SIZES["img_dim"])).astype(np.float32))
    words = ["a", "dog", "runs", "zebra"]       # "zebra" is not in the vocab: <unk>
    # One sentence each (a final "." at most), so that no punkt data is needed.
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 7))) + rng.choice(["", " .", "."])
             for _ in range(5 * n_img)]
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


needs_nltk = pytest.mark.skipif(not _has_nltk(), reason="tokenising captions needs nltk (not "
                                                        "on the GPU image)")


@needs_nltk
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
    assert_close(np.load(saved), ensemble.numpy(), F32_SAME_MATH, check_dtype=False)
    assert np.load(saved).dtype == np.float64           # averaged and kept in float64, as public
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


@pytest.mark.parametrize("head", scorers.names(keyword_only=True))
def test_eval_embeddings_with_every_head_of_the_registry(tmp_path, head):
    ds = data.synthetic(n_images=6, regions=4, dim=16, seed=3)
    data.save_embeddings(tmp_path / "emb", *ds)
    saved, out = tmp_path / "sims.npy", tmp_path / "eval.json"
    rc = cli.main(["eval", "--embeddings", str(tmp_path / "emb"), "--head", head, "--protocol",
                   "f30k", "--any-size", "--save", str(saved), "--json", str(out), *FAST])
    assert rc == 0
    expected = evaluation.all_pairs(ds.img, ds.cap, ds.lens, head, backend="reference",
                                    progress=False)
    assert_close(torch.from_numpy(np.load(saved)), expected, F32_SAME_MATH)
    name = json.loads(out.read_text())["models"][0]["name"]
    assert name == f"{scorers.scoring(head).label()} [reference]"


@pytest.mark.parametrize("extra,match", [
    (["--head", "vse"], "--head must be one of"),
    (["--head", "rcar"], "a head with weights: give its --checkpoint"),
    (["--head", "scan", "--checkpoint", "model_best.pth"], "a checkpoint brings its own head"),
])
def test_eval_head_errors_are_one_line(tmp_path, capsys, monkeypatch, extra, match):
    ds = data.synthetic(n_images=3, regions=2, dim=8, seed=0)
    data.save_embeddings(tmp_path / "emb", *ds)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_best.pth").write_bytes(b"")
    assert cli.main(["eval", "--embeddings", str(tmp_path / "emb"), *extra, *FAST]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["eval"], "eval needs --checkpoint and --data, or --embeddings"),
    (["eval", "--checkpoint", "nope.pth", "--data", "."], "not found"),
    (["eval", "--embeddings", "nowhere"], "embeddings directory not found"),
])
def test_eval_errors_are_reported(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + FAST) == 2
    assert match in capsys.readouterr().err


def test_a_split_of_any_size_evaluates_with_the_protocol_chosen_from_its_size(tmp_path, capsys):
    ds = data.synthetic(n_images=4, regions=2, dim=8, seed=1)
    data.save_embeddings(tmp_path, *ds)
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--protocol", "f30k", *FAST]) == 2
    assert "expects 1000 images" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--json", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "protocol all (chosen from the size), 4 images, 20 captions" in printed
    assert "Image to text: " in printed and "Average t2i Recall: " in printed   # public lines
    result = json.loads(out.read_text())
    assert result["protocol"] == "all" and result["protocol_choice"] == "chosen from the size"
    sims = evaluation.all_pairs(*ds, "scan", backend="reference", progress=False)
    assert list(result["metrics"].values())[0] == pytest.approx(metrics.recall_metrics(sims))
    # --any-size is still accepted
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--protocol", "f30k", "--any-size",
                     *FAST]) == 0


@pytest.mark.parametrize("n_img,expected", [(5000, ["coco5k", "coco1k"]), (1000, ["f30k"]),
                                            (1014, ["all"]), (3, ["all"])])
def test_protocols_for_size(n_img, expected):
    assert evaluation.protocols_for_size(n_img) == expected


def _embeddings(folder, seed, n_images=6, dim=8):
    ds = data.synthetic(n_images=n_images, regions=3, dim=dim, seed=seed)
    data.save_embeddings(folder, *ds)
    return ds


def test_save_public_format_and_ensemble_of_any_number(tmp_path, capsys):
    sets = [_embeddings(tmp_path / f"e{i}", seed=i) for i in range(3)]
    saved = []
    for i, fmt in enumerate(["public", "matrix", "public"]):
        saved.append(tmp_path / f"results_{i}.npy")
        assert cli.main(["eval", "--embeddings", str(tmp_path / f"e{i}"), "--save",
                         str(saved[-1]), "--save-format", fmt, *FAST]) == 0
    mats = [evaluation.all_pairs(*ds, "scan", backend="reference", progress=False).double().numpy()
            for ds in sets]
    # What the public eval_ensemble reads: np.load(allow_pickle=True).tolist()
    public = np.load(saved[0], allow_pickle=True).tolist()
    assert set(public) == {"npts", "sims"} and public["npts"] == 6
    assert public["sims"].dtype == np.float64 and public["sims"].shape == (6, 30)
    assert_close(public["sims"], mats[0], F32_EXACT_FILE, check_dtype=False)
    out = tmp_path / "ens.json"
    assert cli.main(["ensemble", *map(str, saved), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    stored = [evaluation.load_results(p) for p in saved]
    assert result["metrics"]["ensemble (ALL)"] == pytest.approx(
        metrics.recall_metrics(np.array([np.asarray(m, np.float64) for m in stored]).mean(0)))
    assert len(result["metrics"]) == 4
    # --ensemble with --embeddings: several folders (SCAN t2i each), plus a saved result.
    out2 = tmp_path / "ens2.json"
    assert cli.main(["eval", "--embeddings", str(tmp_path / "e0"), str(tmp_path / "e1"),
                     "--ensemble", str(saved[2]), "--json", str(out2), *FAST]) == 0
    result2 = json.loads(out2.read_text())
    assert result2["metrics"]["ensemble (ALL)"] == result["metrics"]["ensemble (ALL)"]
    assert cli.main(["ensemble", str(saved[0])]) == 2
    assert "at least two" in capsys.readouterr().err


def test_ensemble_of_checkpoint_heads_on_their_own_embeddings(tmp_path):
    dim = SIZES["embed_size"]
    sets = [_embeddings(tmp_path / f"e{i}", seed=10 + i, dim=dim) for i in range(2)]
    t2i, i2t = tmp_path / "t2i.pth", tmp_path / "i2t.pth"
    make_official_checkpoint(t2i)
    make_official_checkpoint(i2t, official_opt(attn_type="i2t", i2t_smooth=4.0))
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--embeddings", str(tmp_path / "e0"), str(tmp_path / "e1"),
                     "--checkpoint", str(t2i), "--ensemble", str(i2t), "--json", str(out),
                     *FAST]) == 0
    result = json.loads(out.read_text())
    with torch.no_grad():
        sims = [load_rcar_checkpoint(c).sim_enc.forward_vectorized(*ds)
                for c, ds in zip((t2i, i2t), sets)]
    assert result["metrics"]["ensemble (ALL)"] == pytest.approx(
        metrics.recall_metrics(metrics.ensemble(*sims)))
    assert [m["embeddings"] for m in result["models"]] == [str(tmp_path / "e0"), str(tmp_path / "e1")]
    three = ["--embeddings", str(tmp_path / "e0"), str(tmp_path / "e1"), str(tmp_path / "e0")]
    assert cli.main(["eval", *three, "--checkpoint", str(t2i), "--ensemble", str(i2t), *FAST]) == 2


class _NoCompute:
    """all_pairs replaced: a user error must be found before any computation."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(evaluation, "all_pairs", self)

    def __call__(self, *args, **kwargs):
        raise AssertionError("the computation started before the error was found")


@pytest.mark.parametrize("flag", ["--save", "--json"])
@pytest.mark.parametrize("where", ["folder", "missing"])
def test_bad_output_paths_are_refused_before_the_computation(tmp_path, capsys, monkeypatch,
                                                             flag, where):
    _embeddings(tmp_path / "emb", seed=0)
    (tmp_path / "folder").mkdir()
    target = tmp_path / "folder" if where == "folder" else tmp_path / "missing" / "x.npy"
    _NoCompute(monkeypatch)
    assert cli.main(["eval", "--embeddings", str(tmp_path / "emb"), flag, str(target), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {target}" in err and ("is a folder" in err or "does not exist" in err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["eval", "--embeddings", "x", "--batch-size", "0"], "expected a positive integer, got 0"),
    (["eval", "--embeddings", "x", "--batch-size", "-5"], "expected a positive integer, got -5"),
    (["eval", "--embeddings", "x", "--img-block", "0"], "expected a positive integer"),
    (["demo", "--images", "0"], "expected a positive integer, got 0"),
    (["demo", "--reference-pairs", "-1"], "expected an integer >= 0"),
])
def test_bad_numbers_are_refused_not_replaced(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    _embeddings(tmp_path, seed=0)
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--device", "cuda", *FAST]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluation.all_pairs(torch.zeros(1, 2, 3), torch.zeros(5, 2, 3), torch.ones(5, dtype=torch.long),
                             "scan", device="cuda", progress=False)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _break_img_embs(folder, kind):
    (folder / "img_embs.npy").unlink()
    if kind == "malicious":
        torch.save({"x": _Evil()}, folder / "img_embs.pt")
    elif kind == "truncated_pt":
        torch.save(torch.zeros(6, 3, 8), folder / "img_embs.pt")
        content = (folder / "img_embs.pt").read_bytes()
        (folder / "img_embs.pt").write_bytes(content[:len(content) // 2])
    else:
        np.save(folder / "img_embs.npy", np.zeros((6, 3, 8), np.float32))
        content = (folder / "img_embs.npy").read_bytes()
        (folder / "img_embs.npy").write_bytes(content[:len(content) // 2])


@pytest.mark.parametrize("kind", ["malicious", "truncated_pt", "truncated_npy"])
def test_bad_embedding_files_give_one_line_and_exit_2(tmp_path, capsys, kind):
    _embeddings(tmp_path, seed=0)
    _break_img_embs(tmp_path, kind)
    assert cli.main(["eval", "--embeddings", str(tmp_path), *FAST]) == 2
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert "img_embs." in captured.err
    with pytest.raises(ValueError, match="img_embs"):          # --debug: the real exception
        cli.main(["eval", "--embeddings", str(tmp_path), "--debug", *FAST])


@pytest.mark.parametrize("dtype", [np.bool_, np.float32, np.complex64])
def test_cap_lens_of_a_non_integer_dtype_are_refused(tmp_path, capsys, dtype):
    _embeddings(tmp_path, seed=0)
    np.save(tmp_path / "cap_lens.npy", np.ones(30, dtype=dtype))
    assert cli.main(["eval", "--embeddings", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "cap_lens.npy must hold integer lengths" in err and str(np.dtype(dtype)) in err


@needs_nltk
@pytest.mark.parametrize("bad_id", [-1, "x"])
def test_vocab_with_a_bad_id_is_refused(tmp_path, capsys, bad_id):
    split_dir, vocab = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=2, seed=0)
    make_vocab(vocab)
    content = json.loads(vocab.read_text())
    content["word2idx"]["dog"] = bad_id
    vocab.write_text(json.dumps(content))
    ckpt = tmp_path / "t2i.pth"
    make_official_checkpoint(ckpt)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(split_dir), "--vocab",
                     str(vocab), *FAST]) == 2
    assert "the id of 'dog' must be a non-negative integer" in capsys.readouterr().err


@needs_nltk
def test_multi_sentence_captions_without_punkt(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "_punkt_installed", lambda nltk_module: False)
    split_dir, vocab = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=2, seed=0)
    lines = (split_dir / "testall_caps.txt").read_text().splitlines()
    lines[3] = "a dog. a dog runs"
    (split_dir / "testall_caps.txt").write_text("\n".join(lines) + "\n")
    make_vocab(vocab)
    ckpt = tmp_path / "t2i.pth"
    make_official_checkpoint(ckpt)
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(split_dir), "--vocab", str(vocab), *FAST]
    _NoCompute(monkeypatch)
    assert cli.main(argv) == 2
    assert "python -m nltk.downloader" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(data, "_punkt_installed", lambda nltk_module: False)
    out = tmp_path / "r.json"
    assert cli.main(argv + ["--allow-unsplit-sentences", "--json", str(out)]) == 0
    assert "1 captions were tokenised as one sentence" in capsys.readouterr().err
    tokenizer = json.loads(out.read_text())["tokenizer"]
    assert tokenizer["mode"] == "preserve_line" and tokenizer["unsplit_captions"] == 1
    assert tokenizer["name"] == "nltk.tokenize.word_tokenize"


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


def test_public_log_lines_for_the_1k_folds(tmp_path, capsys):
    ds = _embeddings(tmp_path, seed=4, n_images=10)
    assert cli.main(["eval", "--embeddings", str(tmp_path), "--protocol", "coco1k", "--any-size",
                     *FAST]) == 0
    printed = capsys.readouterr().out
    sims = evaluation.all_pairs(*ds, "scan", backend="reference", progress=False)
    mean, folds = metrics.coco1k_metrics(sims, fold_size=2, return_folds=True)
    assert printed.count("Image to text: ") == 6 and "Mean metrics: " in printed
    assert printed.rstrip().split("Mean metrics: \n")[1].startswith(metrics.public_report(mean))
    first = folds[0]
    assert ("Image to text: %.1f, %.1f, %.1f" % (first["i2t_r1"], first["i2t_r5"], first["i2t_r10"])
            in printed)


def test_interrupt_is_reported_without_a_traceback(tmp_path, capsys, monkeypatch):
    _embeddings(tmp_path, seed=0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "all_pairs", interrupted)
    assert cli.main(["eval", "--embeddings", str(tmp_path), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_eval_without_nltk_names_the_install(tmp_path, capsys, monkeypatch):
    split_dir, vocab = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=2, seed=0)
    make_vocab(vocab)
    ckpt = tmp_path / "t2i.pth"
    make_official_checkpoint(ckpt)
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.tokenize", None)
    _NoCompute(monkeypatch)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(split_dir), "--vocab",
                     str(vocab), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pip install nltk" in err and len(err.strip().splitlines()) == 1


TRICKY_CAPTIONS = ["A man in a t-shirt holds a 3.5 inch phone.", "The clock shows 11:20",
                   "Salt and/or pepper", "A dog can't fly , it cannot", "It's a \"quoted\" sign",
                   "A cat on a couch ...", "A caf\u00e9 sign", "Two dogs (one brown) play!",
                   "A sign that says 'stop.'", "A bus"]


@needs_nltk
def test_eval_word_ids_are_those_of_the_public_word_tokenize(tmp_path, capsys, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    monkeypatch.setattr(data, "_punkt_installed", lambda nltk_module: False)   # as here
    split_dir, vocab_path = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=2, seed=0)
    (split_dir / "testall_caps.txt").write_text("\n".join(TRICKY_CAPTIONS) + "\n")
    words = ("<pad>", "<start>", "<end>", "<unk>", "a", "t-shirt", "3.5", "11:20", "and/or",
             "ca", "n't", "can", "not", "it", "'s", "``", "''", "...", "caf\u00e9", "(", ")",
             "!", "'stop", ".", "'", "dog", "sign", "bus", "clock", "man")
    write_vocab(vocab_path, words)
    ckpt = tmp_path / "t2i.pth"
    make_official_checkpoint(ckpt)
    saved = tmp_path / "sims.npy"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(split_dir), "--vocab",
                     str(vocab_path), "--save", str(saved), *FAST]) == 0, capsys.readouterr().err
    # The public loader's call, its sentence split by punkt (untrained here: these captions
    # have no sentence boundary to decide, so any punkt model gives one sentence).
    monkeypatch.setattr(nltk.tokenize, "_get_punkt_tokenizer",
                        lambda language="english": PunktSentenceTokenizer())
    vocab = data.load_vocab(vocab_path)
    ids = [[vocab("<start>")] + [vocab(t) for t in nltk.tokenize.word_tokenize(c.lower())]
           + [vocab("<end>")] for c in TRICKY_CAPTIONS]
    used = {i for seq in ids for i in seq}
    for token in ("t-shirt", "3.5", "11:20", "and/or", "ca", "n't", "can", "not", "'s", "``",
                  "''", "...", "caf\u00e9", "(", "!", "'"):
        assert vocab(token) in used and vocab(token) != vocab("<unk>"), token
    model = load_rcar_checkpoint(ckpt)
    split = data.load_precomp(split_dir, "testall")
    img = model.encode_images(split.images)
    cap, lens = model.encode_captions(ids)
    with torch.no_grad():
        want = model.sim_enc.forward_vectorized(img, cap, lens)
    assert_close(np.load(saved), want.numpy(), F32_SAME_MATH, check_dtype=False)
