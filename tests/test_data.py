"""The synthetic default set and the loaders of the precomputed / pre-encoded formats."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rcar_fast import data
from rcar_fast.data import (SYNTHETIC_BLOCK_IMAGES, load_embeddings, load_precomp, load_vocab,
                            pad_captions, save_embeddings, synthetic, tokenize)
from tests.tolerances import HALF_STORAGE, UNIT_NORM_F32, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    return synthetic(n_images=60, regions=7, dim=96, min_len=3, max_len=14, seed=5)


def test_synthetic_shapes_lengths_and_padding(small):
    img, cap, lens = small
    assert img.shape == (60, 7, 96) and img.dtype == torch.float32
    assert cap.shape == (300, int(lens.max()), 96) and lens.dtype == torch.int64
    assert small.captions_per_image == 5
    assert 3 <= int(lens.min()) and int(lens.max()) <= 14
    assert len(torch.unique(lens)) > 4                 # lengths vary like real captions
    padding = torch.arange(cap.shape[1])[None, :] >= lens[:, None]
    assert not cap[padding].any()                      # zeros beyond each length
    # Every real vector is l2-normalised, like encoder outputs.
    assert_close(img.norm(dim=-1), torch.ones(60, 7), UNIT_NORM_F32)
    assert_close(cap[~padding].norm(dim=-1), torch.ones(int(lens.sum())), UNIT_NORM_F32)


def test_synthetic_is_deterministic_and_seeded(small):
    again = synthetic(n_images=60, regions=7, dim=96, min_len=3, max_len=14, seed=5)
    for a, b in zip(small, again):
        assert torch.equal(a, b)
    other = synthetic(n_images=60, regions=7, dim=96, min_len=3, max_len=14, seed=6)
    assert not torch.equal(small.img, other.img)


def test_synthetic_prefix_is_the_smaller_set():
    # Blocks are seeded independently: the first blocks of a bigger set are the smaller set.
    n = SYNTHETIC_BLOCK_IMAGES
    big = synthetic(n_images=2 * n + 7, regions=3, dim=16, seed=2)
    little = synthetic(n_images=n, regions=3, dim=16, seed=2)
    assert torch.equal(big.img[:n], little.img)
    assert torch.equal(big.lens[:5 * n], little.lens)
    assert torch.equal(big.cap[:5 * n, :little.cap.shape[1]], little.cap)
    assert not big.cap[:5 * n, little.cap.shape[1]:].any()


def test_synthetic_same_in_another_process_with_other_thread_counts(tmp_path):
    """Same arguments, same numbers, whatever the thread count (no BLAS in the generator)."""
    script = (
        "import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]);"
        "from rcar_fast.data import synthetic;"
        "d = synthetic(n_images=30, regions=4, dim=40, seed=9);"
        "torch.save(tuple(d), sys.argv[2])")
    out = tmp_path / "set.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, REPO, str(out)], check=True, env=env)
    theirs = torch.load(out)
    ours = synthetic(n_images=30, regions=4, dim=40, seed=9)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_synthetic_float16_is_the_rounded_float32():
    full = synthetic(n_images=10, regions=4, dim=32, seed=1)
    half = synthetic(n_images=10, regions=4, dim=32, seed=1, dtype=torch.float16)
    assert half.img.dtype == torch.float16 and half.cap.dtype == torch.float16
    # Both are rounded once from the same float64 values.
    assert_close(half.img.float(), full.img, HALF_STORAGE)
    assert_close(half.cap.float(), full.cap, HALF_STORAGE)


def test_synthetic_captions_describe_their_own_image():
    ds = synthetic(n_images=40, regions=12, dim=256, seed=3)
    # Best-region cosine per word, averaged over the caption's words: own image vs others.
    best = torch.einsum("ird,jld->ijlr", ds.img, ds.cap).amax(-1).sum(-1) / ds.lens
    own = best[torch.arange(200) // 5, torch.arange(200)]
    others_mean = (best.sum(0) - own) / 39
    assert (own > others_mean).float().mean() > 0.95
    # ... but far from trivially: noise makes many captions prefer another image.
    assert (best.argmax(0) == torch.arange(200) // 5).float().mean() < 0.995


def test_noise_controls_difficulty():
    def top1(noise):
        ds = synthetic(n_images=40, regions=12, dim=256, seed=4, noise=noise)
        best = torch.einsum("ird,jld->ijlr", ds.img, ds.cap).amax(-1).sum(-1) / ds.lens
        return float((best.argmax(0) == torch.arange(200) // 5).float().mean())
    easy, default, hard = top1(0.5), top1(3.0), top1(12.0)
    assert easy > default > hard
    assert easy > 0.9 and hard < 0.3


def test_synthetic_scan_recall_is_meaningful():
    """With the published SCAN t2i settings the default set gives rankings that are neither
    perfect nor random. (At the default 1000 images: t2i R@1 about 43%, see data.py.)"""
    from rcar_fast import metrics, reference

    ds = synthetic(n_images=50)
    sims = reference.scan_similarity_vectorized(ds.img, ds.cap, ds.lens)
    m = metrics.recall_metrics(sims)
    assert 40.0 < m["t2i_r1"] < 97.0, m
    assert m["t2i_r10"] > m["t2i_r1"] + 5.0, m
    assert m["i2t_r1"] > 50.0, m


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(n_images=0), ValueError, "n_images must be a positive integer"),
    (dict(dim=2.5), ValueError, "dim must be a positive integer"),
    (dict(min_len=8, max_len=5), ValueError, "max_len must be an integer >= min_len"),
    (dict(noise=-1.0), ValueError, "noise must be a finite number >= 0"),
    (dict(noise=float("nan")), ValueError, "noise must be a finite number >= 0"),
    (dict(function_word_rate=1.0), ValueError, r"function_word_rate must be in \[0, 1\)"),
    (dict(dtype=torch.int32), TypeError, "dtype must be a floating torch.dtype"),
    (dict(objects_per_image=20, n_concepts=10), ValueError, "objects_per_image"),
])
def test_synthetic_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic(**{"n_images": 4, "dim": 8, **kwargs})


def test_named_sizes():
    assert data.synthetic_size("coco5k") == (5000, 1024)
    with pytest.raises(ValueError, match="unknown synthetic size 'huge'"):
        data.synthetic_size("huge")


# ---------------------------------------------------------------------------------------------
# vocabulary, tokens
# ---------------------------------------------------------------------------------------------

def write_vocab(path, words=("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", ".")):
    word2idx = {w: i for i, w in enumerate(words)}
    path.write_text(json.dumps({"word2idx": word2idx,
                                "idx2word": {str(i): w for w, i in word2idx.items()},
                                "idx": len(words)}))
    return word2idx


def test_vocab_encodes_like_the_public_loader(tmp_path):
    pytest.importorskip("nltk", reason="tokenising needs nltk (absent on the GPU image)")
    w2i = write_vocab(tmp_path / "vocab.json")
    vocab = load_vocab(tmp_path / "vocab.json")
    assert len(vocab) == len(w2i)
    ids = vocab.encode("A dog runs to the park.")
    assert ids == [w2i["<start>"], w2i["a"], w2i["dog"], w2i["runs"], w2i["<unk>"],
                   w2i["<unk>"], w2i["<unk>"], w2i["."], w2i["<end>"]]


def test_tokenize_splits_punctuation_and_clitics():
    pytest.importorskip("nltk", reason="tokenising needs nltk (absent on the GPU image)")
    tokens = tokenize("A man's dog, don't it?")
    assert tokens[:3] == ["a", "man", "'s"] and "," in tokens and "?" in tokens
    assert "n't" in tokens


@pytest.mark.parametrize("content,error,match", [
    (None, FileNotFoundError, "vocabulary file not found"),
    ("{not json", ValueError, "not valid json"),
    ('{"idx2word": {}}', ValueError, "'word2idx' mapping"),
    ('{"word2idx": {"a": 0}}', ValueError, "no '<unk>' entry"),
])
def test_vocab_errors(tmp_path, content, error, match):
    path = tmp_path / "vocab.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        load_vocab(path)


# ---------------------------------------------------------------------------------------------
# precomputed split
# ---------------------------------------------------------------------------------------------

def write_precomp(folder, n_img=3, per_image=5, repeat_images=False, trailing_newline=True):
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.random.default_rng(0).random((n_img, 4, 6)).astype(np.float32)
    if repeat_images:
        ims = np.repeat(ims, per_image, axis=0)
    np.save(folder / "testall_ims.npy", ims)
    lines = [f"caption {j} of image {j // per_image}" for j in range(n_img * per_image)]
    (folder / "testall_caps.txt").write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    return ims, lines


@pytest.mark.parametrize("subfolder", ["", "precomp"])
def test_load_precomp(tmp_path, subfolder):
    ims, lines = write_precomp(tmp_path / subfolder if subfolder else tmp_path)
    split = load_precomp(tmp_path, "testall")
    assert isinstance(split.images, np.memmap)          # features are not read eagerly
    np.testing.assert_array_equal(split.images, ims)
    assert split.captions == lines


def test_load_precomp_repeated_image_rows(tmp_path):
    ims, _ = write_precomp(tmp_path, repeat_images=True, trailing_newline=False)
    split = load_precomp(tmp_path, "testall")
    np.testing.assert_array_equal(split.images, ims[::5])


def test_load_precomp_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="testall_ims.npy not found"):
        load_precomp(tmp_path, "testall")
    write_precomp(tmp_path, n_img=3)
    with open(tmp_path / "testall_caps.txt", "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(ValueError, match="has 16 captions but .* has 3 images; expected 5"):
        load_precomp(tmp_path, "testall")
    np.save(tmp_path / "testall_ims.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"shape \(n_images, regions, img_dim\)"):
        load_precomp(tmp_path, "testall")


# ---------------------------------------------------------------------------------------------
# pre-encoded embeddings
# ---------------------------------------------------------------------------------------------

def as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_embeddings_round_trip(tmp_path, fmt):
    ds = synthetic(n_images=4, regions=3, dim=8, seed=0)
    if fmt == "npy":
        save_embeddings(tmp_path, *ds)
        assert sorted(os.listdir(tmp_path)) == ["cap_embs.npy", "cap_lens.npy", "img_embs.npy"]
    else:
        for stem, value in zip(data.EMBEDDING_FILES, ds):
            torch.save(value, tmp_path / f"{stem}.pt")
    img, cap, lens = load_embeddings(tmp_path)
    assert isinstance(img, np.memmap if fmt == "npy" else torch.Tensor)
    assert torch.equal(as_tensor(img), ds.img)
    assert torch.equal(as_tensor(cap), ds.cap)
    assert torch.equal(lens, ds.lens)


def test_embeddings_with_one_image_row_per_caption(tmp_path):
    # The public encode_data() output repeats each image for each of its captions.
    ds = synthetic(n_images=4, regions=3, dim=8, seed=0)
    save_embeddings(tmp_path, ds.img.repeat_interleave(5, dim=0), ds.cap, ds.lens)
    img, _, _ = load_embeddings(tmp_path)
    assert torch.equal(as_tensor(img), ds.img)


@pytest.mark.parametrize("change,match", [
    (dict(lens=torch.ones(19, dtype=torch.int64)), "has 19 lengths but .* has 20 captions"),
    (dict(lens=torch.full((20,), 99)), r"lengths must lie in \[1, "),
    (dict(img=torch.zeros(3, 3, 8)), "has 20 captions but .* has 3 images"),
    (dict(img=torch.zeros(4, 3, 7)), "has d=7 but"),
    (dict(cap=torch.zeros(20, 8)), r"must have shape \(n_cap, Lmax, d\)"),
])
def test_embeddings_errors(tmp_path, change, match):
    ds = synthetic(n_images=4, regions=3, dim=8, seed=0)
    parts = {"img": ds.img, "cap": ds.cap, "lens": ds.lens, **change}
    save_embeddings(tmp_path, parts["img"], parts["cap"], parts["lens"])
    with pytest.raises(ValueError, match=match):
        load_embeddings(tmp_path)


def test_embeddings_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="embeddings directory not found"):
        load_embeddings(tmp_path / "nope")
    np.save(tmp_path / "img_embs.npy", np.zeros((1, 1, 1)))
    with pytest.raises(FileNotFoundError, match="cap_embs.npy or cap_embs.pt not found"):
        load_embeddings(tmp_path)


def test_pad_captions():
    cap, lens = pad_captions([torch.ones(2, 3), torch.ones(4, 3) * 2])
    assert cap.shape == (2, 4, 3) and lens.tolist() == [2, 4]
    assert not cap[0, 2:].any() and (cap[1] == 2).all()
    with pytest.raises(ValueError, match="at least one word"):
        pad_captions([torch.ones(0, 3)])


def test_dev_split_is_cut_as_the_public_loaders_do(tmp_path):
    # The public loaders evaluate the first 5000 dev captions (1000 images).
    folder = tmp_path / "precomp"
    folder.mkdir()
    n_img = 1003
    np.save(folder / "dev_ims.npy", np.zeros((n_img, 1, 2), np.float32))
    (folder / "dev_caps.txt").write_text("\n".join(f"c{j}" for j in range(5 * n_img)) + "\n")
    split = load_precomp(tmp_path, "dev")
    assert split.images.shape[0] == 1000 and len(split.captions) == 5000
    assert split.captions[-1] == "c4999" and "first 5000 of 5015 captions" in split.note
    (folder / "testall_ims.npy").write_bytes((folder / "dev_ims.npy").read_bytes())
    (folder / "testall_caps.txt").write_text((folder / "dev_caps.txt").read_text())
    assert len(load_precomp(tmp_path, "testall").captions) == 5015


def test_truncated_npy_names_the_file(tmp_path):
    write_precomp(tmp_path)
    content = (tmp_path / "testall_ims.npy").read_bytes()
    (tmp_path / "testall_ims.npy").write_bytes(content[:len(content) // 2])
    with pytest.raises(ValueError, match="testall_ims.npy is not a readable .npy file"):
        load_precomp(tmp_path, "testall")


def test_missing_nltk_names_the_install(monkeypatch):
    # Runs with or without nltk installed (the GPU image has none).
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.tokenize", None)
    monkeypatch.setattr(data, "_DEFAULT_TOKENIZER", [])
    with pytest.raises(data.TokenizerError, match="pip install nltk"):
        data.tokenize("a dog")
    vocab = data.Vocabulary({"<unk>": 0, "<start>": 1, "<end>": 2})
    with pytest.raises(data.TokenizerError, match="pip install nltk"):
        vocab.encode("a dog")
