"""Attention maps of chosen pairs (rcar_fast.attention) and the rcar-fast attention command:
the weights against the reference math, ragged shapes, padding never read, validation, and
rendered PNGs checked by their pixels."""
import os

import numpy as np
import pytest
import torch

from rcar_fast import attention, cli, data, reference_math
from rcar_fast.attention import attention_maps
from rcar_fast.checkpoint import load_rcar_checkpoint
from rcar_fast.encoders import SCANHead
from rcar_fast.heads import RCARHead
from rcar_fast.reference_heads import max_similarity_reference
from tests.inputs import make_inputs
from tests.test_checkpoint import SIZES, make_official_checkpoint
from tests.test_data import write_vocab
from tests.test_scan_checkpoint import save_scan_checkpoint, scan_opt
from tests.tolerances import (BIT_EQUAL, F64_IDENTITY, F64_SOFTMAX_SUMS_TO_ONE, PNG_COLOUR,
                              assert_bit_equal, assert_close)

NAN = float("nan")
PAIRS = [(0, 0), (2, 1), (1, 3), (2, 4)]


def ragged(seed=0, n_img=3, n_cap=5, R=6, d=8, L=7):
    """img with NaN regions beyond img_lens, cap with NaN words beyond lens (both never read)."""
    img, cap, lens = make_inputs(n_img, n_cap, R, d, L, seed=seed)
    img_lens = torch.tensor([R, 3, 1][:n_img])
    for i, n in enumerate(img_lens.tolist()):
        img[i, n:] = NAN
    return img, cap, lens, img_lens


def sliced(img, cap, lens, img_lens, i, j):
    return img[i, :int(img_lens[i])], cap[j, :int(lens[j])]


# ---------------------------------------------------------------------------------------------
# SCAN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_norm", ["clipped_l2norm", "softmax", "no_norm"])
def test_scan_maps_reproduce_the_reference_score(direction, raw_norm):
    """The softmax's rows (t2i) / columns (i2t) sum to 1, and attending with the returned weights
    gives back the reference's SCAN score of the pair (mean cosine of each query with its
    attended context): the maps are the weights the score was computed with."""
    img, cap, lens, img_lens = ragged()
    maps = attention_maps(img, cap, lens, PAIRS, "scan", img_lens=img_lens, direction=direction,
                          raw_norm=raw_norm, smooth=4.0)
    axis = 1 if direction == "t2i" else 0
    for (i, j), weights in zip(PAIRS, maps):
        regions, words = sliced(img, cap, lens, img_lens, i, j)
        assert weights.shape == (len(words), len(regions)) and weights.dtype == torch.float64
        assert_close(weights.sum(dim=axis), torch.ones(weights.shape[1 - axis], dtype=torch.float64),
                     F64_SOFTMAX_SUMS_TO_ONE)
        query, context = (words, regions) if direction == "t2i" else (regions, words)
        alpha = weights if direction == "t2i" else weights.T
        score = reference_math.cosine(query, alpha @ context).mean()
        want = reference_math.scan_similarity_loop(regions[None], words[None],
                                                   [len(words)], direction=direction,
                                                   raw_norm=raw_norm, smooth=4.0)[0, 0]
        assert_close(score, want, F64_IDENTITY, what=f"pair {(i, j)}")


def test_padding_is_never_read_and_float32_inputs_give_the_same_float64_maps():
    img, cap, lens, img_lens = ragged(seed=1)
    clean_img, clean_cap = img.nan_to_num(7.0), cap.nan_to_num(-3.0)
    for head, kw in (("scan", {}), ("aladin", {}), ("maxsim", {"coding": "vsa"})):
        direction = "i2t" if kw else None
        got = attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, direction=direction, **kw)
        want = attention_maps(clean_img, clean_cap, lens, PAIRS, head, img_lens=img_lens,
                              direction=direction, **kw)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            assert_bit_equal(g, w, what=head)
    f32 = attention_maps(img.float(), cap.float(), lens, PAIRS, img_lens=img_lens)
    f64 = attention_maps(img.float().double(), cap.float().double(), lens, PAIRS, img_lens=img_lens)
    for g, w in zip(f32, f64):
        assert g.dtype == torch.float64
        assert_bit_equal(g, w)


def test_pair_forms_and_ragged_shapes():
    img, cap, lens, img_lens = ragged()
    as_list = attention_maps(img, cap, lens, PAIRS, img_lens=img_lens)
    as_array = attention_maps(img, cap, lens, np.array(PAIRS), img_lens=img_lens)
    as_tensor = attention_maps(img, cap, lens, torch.tensor(PAIRS), img_lens=img_lens)
    assert [tuple(m.shape) for m in as_list] == [(int(lens[j]), int(img_lens[i])) for i, j in PAIRS]
    for a, b, c in zip(as_list, as_array, as_tensor):
        assert_bit_equal(a, b)
        assert_bit_equal(a, c)
    assert attention_maps(img, cap, lens, [], img_lens=img_lens) == []


def test_a_scan_checkpoints_head_maps_with_its_own_settings():
    img, cap, lens, img_lens = ragged(seed=7)
    head = SCANHead(direction="i2t", raw_norm="l2norm", smooth=4.0, agg="mean")
    got = attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens)
    want = attention_maps(img, cap, lens, PAIRS, "scan", img_lens=img_lens, direction="i2t",
                          raw_norm="l2norm", smooth=4.0)
    for g, w in zip(got, want):
        assert_bit_equal(g, w)
    with pytest.raises(ValueError, match="not a direction of this SCANHead"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, direction="t2i")
    with pytest.raises(TypeError, match="do not apply to a SCANHead"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, smooth=9.0)


# ---------------------------------------------------------------------------------------------
# RCAR: the last step's attention
# ---------------------------------------------------------------------------------------------

def _head(regulator, steps, direction="t2i", d=8, seed=0):
    torch.manual_seed(seed)
    return RCARHead(d, 6, regulator, steps, direction, smooth=5.0).double().eval()


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_rcar_last_step_uses_the_regulated_temperature(direction):
    """With RCR's modulation switched off (rcr_matrix_w -> 0, so m = tanh(0) + 1 = 1) and its
    temperature output a constant b, RCAR's last step is SCAN's attention at smooth + b, and
    its first step SCAN's at smooth: the maps come from the regulated step, not the first."""
    head = _head("coop_rcar", 2, direction)
    with torch.no_grad():
        for module in head.rcr_modules[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        head.rcr_modules[0].rcr_smooth_w[2].bias.fill_(3.0)
    img, cap, lens, img_lens = ragged(seed=2)
    last = attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens)
    first = attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, step=0)
    for smooth, maps in ((8.0, last), (5.0, first)):
        scan = attention_maps(img, cap, lens, PAIRS, "scan", img_lens=img_lens,
                              direction=direction, smooth=smooth)
        for got, want in zip(maps, scan):
            assert_close(got, want, F64_IDENTITY, what=f"smooth {smooth}")
    assert not torch.allclose(last[0], first[0])


def test_only_rcr_final_attention_reproduces_the_head_score():
    """only_rcr scores mean_k cos(q_k, l2norm(ctx_k)) with its final attention: attending with
    the returned last-step weights gives back the head's own score; 2 steps -> 3 attentions."""
    head = _head("only_rcr", 2)
    assert attention.attention_steps(head) == 3
    img, cap, lens, img_lens = ragged(seed=3)
    maps = attention_maps(img.float(), cap.float(), lens, PAIRS, head, img_lens=img_lens)
    for (i, j), weights in zip(PAIRS, maps):
        regions, words = sliced(img.float().double(), cap.float().double(), lens, img_lens, i, j)
        assert_close(weights.sum(dim=1), torch.ones(len(words), dtype=torch.float64),
                     F64_SOFTMAX_SUMS_TO_ONE)
        score = reference_math.cosine(words, weights @ regions).mean()
        want = head.forward_loop(regions[None], words[None], [len(words)])[0, 0]
        assert_close(score, want, F64_IDENTITY)


def test_the_callers_rcar_head_is_not_changed():
    """A float32 head in training mode keeps its dtype, weights and mode, and the global RNG
    is not drawn from (RAR's dropout plays no part in the attention)."""
    head = _head("coop_rcar", 2).float().train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    img, cap, lens, img_lens = ragged(seed=4)
    rng = torch.get_rng_state()
    in_training = attention_maps(img.float(), cap.float(), lens, PAIRS, head, img_lens=img_lens)
    assert torch.equal(torch.get_rng_state(), rng) and head.training
    assert all(v.dtype == torch.float32 for v in head.state_dict().values())
    for k, v in head.state_dict().items():
        assert_bit_equal(v, before[k], what=k)
    in_eval = attention_maps(img.float(), cap.float(), lens, PAIRS, head.eval(), img_lens=img_lens)
    for a, b in zip(in_training, in_eval):
        assert_bit_equal(a, b)


# ---------------------------------------------------------------------------------------------
# The S-only heads: the argmax one-hot
# ---------------------------------------------------------------------------------------------

def test_maxsim_one_hot_at_the_first_argmax_and_the_max_it_selects():
    img, cap, lens, img_lens = ragged(seed=5)
    with torch.no_grad():
        img[0, 4] = img[0, 1]            # regions 1 and 4 of image 0 tie for every word
        cap[3, 2] = cap[3, 0]            # words 0 and 2 of caption 3 tie for every region
    for direction in ("t2i", "i2t"):
        maps = attention_maps(img, cap, lens, PAIRS, "colbert" if direction == "t2i" else "maxsim",
                              img_lens=img_lens, direction=direction)
        for (i, j), one_hot in zip(PAIRS, maps):
            regions, words = sliced(img, cap, lens, img_lens, i, j)
            tile = regions @ words.T                                   # (R_i, L)
            axis = 1 if direction == "t2i" else 0                      # the one-hot's axis
            assert set(one_hot.unique().tolist()) <= {0.0, 1.0}
            assert_bit_equal(one_hot.sum(dim=axis), torch.ones(one_hot.shape[1 - axis],
                                                               dtype=torch.float64))
            maxima = tile.amax(dim=0 if direction == "t2i" else 1)
            assert_bit_equal((one_hot * tile.T).sum(dim=axis), maxima)
            # the maxima the one-hots select, summed: the reference's MrSw / MwSr score
            want = max_similarity_reference(img, cap, lens, img_lens, direction=direction,
                                            pool="sum", loop=True)[i, j]
            assert_close(maxima.sum(), want, F64_IDENTITY)
            first = one_hot.argmax(dim=axis)                   # argmax of a one-hot: its 1
            if (i, j, direction) == (0, 0, "t2i"):
                assert (first != 4).all() and (first == 1).any(), "ties go to the first region"
            if (i, j, direction) == (1, 3, "i2t"):
                assert (first != 2).all() and (first == 0).any(), "ties go to the first word"


def test_unit_normalisation_changes_the_argmax_leaky_and_pool_do_not():
    word = torch.tensor([1.0, 0.0])
    img = torch.tensor([[[3.0, 3.0], [1.0, 0.01]]], dtype=torch.float64)   # long vs aligned
    cap = word.to(torch.float64)[None, None]
    (raw,) = attention_maps(img, cap, [1], [(0, 0)], "dvsa")
    (unit,) = attention_maps(img, cap, [1], [(0, 0)], "aladin")
    assert raw.tolist() == [[1.0, 0.0]] and unit.tolist() == [[0.0, 1.0]]
    (same,) = attention_maps(img, cap, [1], [(0, 0)], "maxsim", normalize="unit", leaky=True,
                             pool="lse", tau=0.5)
    assert_bit_equal(same, unit)


def test_vsa_coding_columns_are_each_regions_softmax_over_the_words():
    img, cap, lens, img_lens = ragged(seed=6)
    maps = attention_maps(img, cap, lens, PAIRS, "maxsim", img_lens=img_lens, coding="vsa",
                          vsa_tau=0.5, direction="i2t")
    for (i, j), weights in zip(PAIRS, maps):
        regions, words = sliced(img, cap, lens, img_lens, i, j)
        assert_close(weights.sum(dim=0), torch.ones(len(regions), dtype=torch.float64),
                     F64_SOFTMAX_SUMS_TO_ONE)
        # CHAN's VSA code of each region from these weights, summed: the reference's score
        context = weights.T @ words                                    # c_r (R_i, d)
        codes = (regions * context).sum(dim=1) / (context.norm(dim=1) + reference_math.EPS)
        want = max_similarity_reference(img, cap, lens, img_lens, direction="i2t", pool="sum",
                                        coding="vsa", vsa_tau=0.5, loop=True)[i, j]
        assert_close(codes.sum(), want, F64_IDENTITY)


def test_head_directions():
    assert attention.head_directions("laps") == ("t2i", "i2t")
    assert attention.head_directions("chan") == ("t2i",)
    assert attention.head_directions("scan") == ("t2i",)
    assert attention.head_directions("maxsim", coding="vsa", direction="i2t") == ("i2t",)
    with pytest.raises(ValueError, match="coding='vsa' .* needs direction='i2t'"):
        attention.head_directions("maxsim", coding="vsa")
    assert attention.head_directions(_head("only_rar", 1, "i2t")) == ("i2t",)


# ---------------------------------------------------------------------------------------------
# Validation: one clear error naming the argument
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (dict(pairs=[(0, 9)]), ValueError, r"pairs: \(0, 9\) is out of range"),
    (dict(pairs=(0, 1)), TypeError, r"one pair \(i, j\) goes in a list"),
    (dict(pairs=np.zeros((2, 3), dtype=int)), TypeError, "pairs must be .* a \\(P, 2\\)"),
    (dict(pairs=[(0.0, 1)]), TypeError, "pairs must be"),
    (dict(head="bogus"), ValueError, "head must be one of"),
    (dict(direction="both"), ValueError, "direction must be one of"),
    (dict(head="chan", direction="i2t"), ValueError, "not a direction of head 'chan'"),
    (dict(head="laps"), ValueError, "direction: head 'laps' scores both directions"),
    (dict(head="chan", normalize="unit"), ValueError,
     r"preset='chan' sets normalize='none', but normalize='unit' was passed"),
    (dict(head="maxsim", preset="chan", normalize="unit"), ValueError, "preset='chan' sets"),
    (dict(head="chan", preset="laps"), ValueError, "contradicts head='chan'"),
    (dict(head="maxsim", pool="median"), ValueError, "pool must be one of"),
    (dict(head="maxsim", tau=0.0), ValueError, "tau must be a positive"),
    (dict(head="maxsim", leaky=1), TypeError, "leaky must be True or False"),
    (dict(head="maxsim", coding="vsa", direction="t2i"), ValueError, "needs direction='i2t'"),
    (dict(head="maxsim", smooth=3.0), TypeError, r"unexpected keyword\(s\) \['smooth'\]"),
    (dict(smooth=0.0), ValueError, "smooth must be a positive"),
    (dict(smooth=5e6), ValueError, "smooth must be at most 1e\\+06"),
    (dict(raw_norm="l3"), ValueError, "raw_norm must be one of"),
    (dict(normalize="unit"), TypeError, r"unexpected SCAN keyword\(s\) \['normalize'\]"),
    (dict(step=0), TypeError, "step applies to an RCAR head only"),
    (dict(img_lens=[7, 1, 1]), ValueError, r"img_lens must lie in \[1, R=6\]"),
    (dict(img_lens=[1, 1]), ValueError, r"img_lens must have shape \(n_img,\) = \(3,\)"),
    (dict(img_lens=[1.0, 1, 1]), TypeError, "img_lens must hold integers"),
    (dict(lens=[9, 1, 1, 1, 1]), ValueError, "lens must lie in"),
])
def test_bad_arguments_are_refused_with_one_clear_error(call, error, match):
    img, cap, lens, img_lens = ragged()
    kw = {"pairs": PAIRS, "img_lens": img_lens, **call}
    args = (img, cap, kw.pop("lens", lens), kw.pop("pairs"), kw.pop("head", "scan"))
    with pytest.raises(error, match=match):
        attention_maps(*args, **kw)


def test_non_finite_real_values_and_rcar_misfits_are_refused():
    img, cap, lens, img_lens = ragged()
    with pytest.raises(ValueError, match=r"img holds NaN or Inf at real positions \(rows < img_lens\)"):
        attention_maps(img, cap, lens, [(1, 0)], img_lens=[6, 4, 1])
    bad_cap = cap.clone()
    bad_cap[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cap holds NaN or Inf at real positions \(rows < lens\)"):
        attention_maps(img, bad_cap, lens, [(0, 1)], img_lens=img_lens)
    head = _head("coop_rcar", 2, d=5)
    with pytest.raises(ValueError, match="embed_dim = 5"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens)
    head = _head("coop_rcar", 2)
    with pytest.raises(ValueError, match=r"step must be an integer in \[-2, 2\)"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, step=2)
    with pytest.raises(ValueError, match="not a direction of this RCAR head"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, direction="i2t")
    with pytest.raises(TypeError, match="do not apply to an RCAR head"):
        attention_maps(img, cap, lens, PAIRS, head, img_lens=img_lens, smooth=3.0)


# ---------------------------------------------------------------------------------------------
# Rendering: the PNGs, checked by their pixels
# ---------------------------------------------------------------------------------------------

def _matplotlib():
    return pytest.importorskip("matplotlib", reason="rendering needs matplotlib")


def _png(path):
    from matplotlib.image import imread

    assert os.path.isfile(path), f"{path} was not written"
    return imread(path)


def _expected_pixels(n_words, n_regions, n_overlays, image_shape, dpi):
    width, height = attention._layout(n_words, n_regions, n_overlays, image_shape)["size"]
    return round(height * dpi), round(width * dpi)


def test_heat_map_cells_take_the_colormap_colour_of_their_weight(tmp_path):
    matplotlib = _matplotlib()
    weights = np.array([[0.1, 0.0, 0.3], [0.2, 0.9, 0.05]])      # hottest (1, 1), 0 at (0, 1)
    fig = attention.render_pair(weights, ["a", "dog"], dpi=60)
    path = attention.save_figure(fig, tmp_path / "map.png")
    png = _png(path)
    height, width = _expected_pixels(2, 3, 0, None, 60)
    assert png.shape[:2] == (height, width)
    assert png[..., :3].std() > 0.1, "the picture is (nearly) constant"
    fig.canvas.draw()
    heat, cmap = fig.axes[0], matplotlib.colormaps[attention.DEFAULT_CMAP]

    def cell_colour(word, region):
        x, y = heat.transData.transform((region, word))         # the cell's centre, y up
        return torch.as_tensor(png[int(height - y), int(x), :3], dtype=torch.float64)

    for (word, region), scaled in (((1, 1), 1.0), ((0, 1), 0.0), ((0, 2), 0.3 / 0.9)):
        want = torch.tensor(cmap(scaled)[:3], dtype=torch.float64)
        assert_close(cell_colour(word, region), want, PNG_COLOUR, what=f"cell {(word, region)}")


def test_overlay_changes_only_the_pixels_inside_the_boxes():
    matplotlib = _matplotlib()
    rng = np.random.default_rng(0)
    image = rng.random((40, 50, 3))
    boxes = np.array([[2, 3, 10, 12], [20.4, 5, 30.6, 25], [25, 20, 45, 35]])
    weights = np.array([0.2, 0.8, 0.5])
    out = attention.overlay(image, boxes, weights)
    inside = np.zeros((40, 50), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        inside[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = True
    changed = (out != image).any(axis=2)
    assert not changed[~inside].any(), "a pixel outside every box changed"
    assert changed[inside].all(), "a pixel inside a box kept the plain image"
    cmap = matplotlib.colormaps[attention.DEFAULT_CMAP]
    # (y 22, x 27) lies in boxes 1 (0.8) and 2 (0.5): the larger weight, the top colour.
    for (y, x), scaled in (((22, 27), 1.0), ((5, 5), 0.25), ((30, 40), 0.625)):
        want = 0.5 * image[y, x] + 0.5 * np.array(cmap(scaled)[:3])
        assert_close(out[y, x], want, F64_IDENTITY, check_dtype=False, what=f"pixel {(y, x)}")
    uint8 = attention.overlay((image * 255).astype(np.uint8), boxes, weights)
    assert not (uint8 != (image * 255).astype(np.uint8) / 255.0).any(axis=2)[~inside].any()


def test_pair_figure_with_overlays(tmp_path):
    _matplotlib()
    rng = np.random.default_rng(1)
    image = rng.random((30, 60, 3))
    boxes = np.array([[0, 0, 20, 15], [30, 10, 59, 29], [10, 5, 40, 25]])
    weights = rng.random((5, 3))
    every = attention.render_pair(weights, image=image, boxes=boxes, dpi=40)
    one = attention.render_pair(weights, image=image, boxes=boxes, word=2, dpi=40)
    assert len(every.axes) == 2 + 5 and len(one.axes) == 2 + 1      # heat map, colorbar, overlays
    for fig, n_overlays in ((every, 5), (one, 1)):
        png = _png(attention.save_figure(fig, tmp_path / f"{n_overlays}.png"))
        assert png.shape[:2] == _expected_pixels(5, 3, n_overlays, image.shape, 40)
    with pytest.raises(ValueError, match="image and boxes go together"):
        attention.render_pair(weights, image=image)
    with pytest.raises(ValueError, match=r"boxes must have shape \(R, 4\) = \(3, 4\)"):
        attention.render_pair(weights, image=image, boxes=boxes[:2])
    with pytest.raises(ValueError, match="x1 <= x2"):
        attention.render_pair(weights, image=image, boxes=boxes[:, [2, 1, 0, 3]])
    with pytest.raises(ValueError, match=r"word must be a word index in \[0, 5\)"):
        attention.render_pair(weights, image=image, boxes=boxes, word=5)
    with pytest.raises(ValueError, match="words: 2 labels for a map of 5 words"):
        attention.render_pair(weights, ["a", "b"])
    with pytest.raises(ValueError, match="cmap must name a matplotlib colormap"):
        attention.render_pair(weights, cmap="no-such-map")


def test_a_failed_write_leaves_no_file(tmp_path):
    _matplotlib()
    fig = attention.render_pair(np.eye(2), dpi=20)

    def half_write(path, **kw):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = half_write
    with pytest.raises(OSError, match="disk full"):
        attention.save_figure(fig, tmp_path / "map.png")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The rcar-fast attention command
# ---------------------------------------------------------------------------------------------

WORDS = ("a dog runs on the green grass near two old trees by a lake today while three small "
         "birds sing in the warm morning light and one cat sleeps").split()   # 29: > any caption


@pytest.fixture
def split(tmp_path):
    """Embeddings of 3 images x 15 captions, the captions' text, two images and their boxes."""
    _matplotlib()
    from matplotlib.image import imsave

    ds = data.synthetic(n_images=3, regions=4, dim=SIZES["embed_size"], seed=3)
    data.save_embeddings(tmp_path / "emb", *ds)
    # The synthetic captions count <start> and <end> in their lengths, as the encoders do:
    # caps.txt holds their text, ids.txt their word ids (for --vocab, no tokenizer needed).
    (tmp_path / "caps.txt").write_text(
        "".join(" ".join(WORDS[:int(n) - 2]) + "\n" for n in ds.lens.tolist()))
    word2idx = write_vocab(tmp_path / "vocab.json", ["<pad>", "<start>", "<end>", "<unk>"]
                           + sorted(set(WORDS)))
    (tmp_path / "ids.txt").write_text("".join(
        " ".join(str(word2idx[w]) for w in ["<start>", *WORDS[:int(n) - 2], "<end>"]) + "\n"
        for n in ds.lens.tolist()))
    rng = np.random.default_rng(2)
    for i in (0, 2):
        imsave(tmp_path / f"im{i}.png", (rng.random((24, 32, 3)) * 255).astype(np.uint8))
    boxes = np.tile(np.array([[0, 0, 10, 10], [12, 2, 30, 12], [2, 12, 16, 23], [18, 14, 31, 23]],
                             dtype=np.float64), (3, 1, 1))
    np.save(tmp_path / "boxes.npy", boxes)
    return ds, tmp_path


def _run(tmp_path, *extra):
    return cli.main(["attention", "--embeddings", str(tmp_path / "emb"), "--out",
                     str(tmp_path / "out"), *extra])


def test_command_writes_a_png_per_pair_with_the_overlay(split, capsys):
    ds, tmp = split
    rc = _run(tmp, "--pairs", "0:0,2:11", "--captions", str(tmp / "ids.txt"), "--vocab",
              str(tmp / "vocab.json"), "--image", str(tmp / "im{img}.png"), "--boxes",
              str(tmp / "boxes.npy"), "--save-weights", "--dpi", "30")
    assert rc == 0
    printed = capsys.readouterr().out.split()
    want = attention_maps(ds.img, ds.cap, ds.lens, [(0, 0), (2, 11)])
    for (i, j), weights in zip([(0, 0), (2, 11)], want):
        stem = tmp / "out" / f"img{i}_cap{j}_t2i"
        assert str(stem) + ".png" in printed
        png = _png(str(stem) + ".png")
        n_words = int(ds.lens[j])
        assert png.shape[:2] == _expected_pixels(n_words, 4, n_words, (24, 32), 30)
        assert png[..., :3].std() > 0.1
        assert_bit_equal(torch.from_numpy(np.load(str(stem) + ".npy")), weights)
    assert sorted(os.listdir(tmp / "out")) == sorted(
        f"img{i}_cap{j}_t2i.{ext}" for i, j in [(0, 0), (2, 11)] for ext in ("png", "npy"))


def test_caption_text_labels_match_the_lengths_with_or_without_start_and_end(split):
    pytest.importorskip("nltk", reason="tokenising caption text needs nltk (absent on the GPU image)")
    ds, tmp = split
    n = int(ds.lens[0])
    labels = attention._caption_labels(str(tmp / "caps.txt"), [0], ds.lens, None)
    assert labels == {0: ["<start>", *WORDS[:n - 2], "<end>"]}
    (tmp / "bare.txt").write_text(" ".join(WORDS[:n]) + "\n")
    assert attention._caption_labels(str(tmp / "bare.txt"), [0], ds.lens, None) == {0: WORDS[:n]}
    assert _run(tmp, "--pairs", "0:0", "--captions", str(tmp / "caps.txt"), "--dpi", "20") == 0
    assert os.path.isfile(tmp / "out" / "img0_cap0_t2i.png")


def test_command_laps_writes_both_directions_and_a_checkpoint_head_its_last_step(split):
    ds, tmp = split
    assert _run(tmp, "--pairs", "1:3", "--head", "laps", "--save-weights", "--dpi", "20") == 0
    for direction in ("t2i", "i2t"):
        (want,) = attention_maps(ds.img, ds.cap, ds.lens, [(1, 3)], "laps", direction=direction)
        got = np.load(tmp / "out" / f"img1_cap3_{direction}.npy")
        assert_bit_equal(torch.from_numpy(got), want)
        assert _png(str(tmp / "out" / f"img1_cap3_{direction}.png")).shape[:2] == \
            _expected_pixels(int(ds.lens[3]), 4, 0, None, 20)
    ckpt = tmp / "model_best.pth"
    make_official_checkpoint(ckpt)
    assert _run(tmp, "--pairs", "2:4", "--checkpoint", str(ckpt), "--save-weights",
                "--dpi", "20") == 0
    (want,) = attention_maps(ds.img, ds.cap, ds.lens, [(2, 4)], load_rcar_checkpoint(ckpt).sim_enc)
    assert_close(torch.from_numpy(np.load(tmp / "out" / "img2_cap4_t2i.npy")), want, BIT_EQUAL)
    save_scan_checkpoint(tmp / "scan.pth.tar", scan_opt(cross_attn="i2t", lambda_softmax=4.0))
    assert _run(tmp, "--pairs", "2:4", "--checkpoint", str(tmp / "scan.pth.tar"),
                "--save-weights", "--dpi", "20") == 0
    (want,) = attention_maps(ds.img, ds.cap, ds.lens, [(2, 4)], "scan", direction="i2t", smooth=4.0)
    assert_bit_equal(torch.from_numpy(np.load(tmp / "out" / "img2_cap4_i2t.npy")), want)


def test_split_boxes_per_image_or_per_caption_row(tmp_path):
    """One boxes file for the split: a row per image, or the public test_ims_bbx.npy's row per
    caption (image i's boxes at row 5 i)."""
    per_caption = np.arange(15 * 4 * 4, dtype=np.float64).reshape(15, 4, 4)
    np.save(tmp_path / "bbx.npy", per_caption)
    path, boxes = attention._boxes_of(str(tmp_path / "bbx.npy"), 2, [(2, 11), (0, 1)], 3, 15)
    assert_bit_equal(torch.from_numpy(boxes), torch.from_numpy(per_caption[10]))
    np.save(tmp_path / "bbx.npy", per_caption[:3])
    _, boxes = attention._boxes_of(str(tmp_path / "bbx.npy"), 2, [(2, 11), (0, 1)], 3, 15)
    assert_bit_equal(torch.from_numpy(boxes), torch.from_numpy(per_caption[2]))
    np.save(tmp_path / "bbx.npy", per_caption[:7])
    with pytest.raises(ValueError, match=r"holds 7 rows of boxes; expected one per image \(3\)"):
        attention._boxes_of(str(tmp_path / "bbx.npy"), 2, [(2, 11)], 3, 15)


@pytest.mark.parametrize("extra,match", [
    (["--pairs", "0-1"], "--pairs must be image:caption index pairs"),
    (["--pairs", "0:1,0:1"], "--pairs lists 0:1 more than once"),
    (["--pairs", "0:99"], r"pairs: \(0, 99\) is out of range"),
    (["--pairs", "0:0", "--image", "{tmp}/im0.png"], "--image and --boxes go together"),
    (["--pairs", "0:0,2:1", "--image", "{tmp}/im0.png", "--boxes", "{tmp}/boxes.npy"],
     "--image names one file but --pairs use several images"),
    (["--pairs", "0:0", "--image", "{tmp}/im0.png", "--boxes", "{tmp}/bad_boxes.npy"],
     r"must have shape \(R, 4\) = \(4, 4\)"),
    (["--pairs", "0:0", "--image", "{tmp}/missing.png", "--boxes", "{tmp}/boxes.npy"],
     "file not found"),
    (["--pairs", "0:0", "--captions", "{tmp}/short_ids.txt", "--vocab", "{tmp}/vocab.json"],
     r"caption 0 has 2 words in --captions .* but \d+ in cap_lens"),
    (["--pairs", "0:0", "--captions", "{tmp}/caps.txt", "--vocab", "{tmp}/vocab.json"],
     "with --vocab each line holds word ids"),
    (["--pairs", "0:0", "--head", "chan", "--smooth", "3"], "--smooth do.* not apply to --head chan"),
    (["--pairs", "0:0", "--head", "chan", "--direction", "i2t"], "not a direction of head 'chan'"),
    (["--pairs", "0:0", "--word", "dog"], "--word selects the word of the overlay"),
    (["--pairs", "0:0", "--word", "zebra", "--captions", "{tmp}/ids.txt", "--vocab",
      "{tmp}/vocab.json", "--image", "{tmp}/im0.png", "--boxes", "{tmp}/boxes.npy"],
     "--word 'zebra' is not a word"),
    (["--pairs", "0:0", "--cmap", "no-such-map"], "cmap must name a matplotlib colormap"),
    (["--pairs", "0:0", "--checkpoint", "{tmp}/scan.pth.tar", "--direction", "t2i"],
     "not a direction of this SCANHead"),
    (["--pairs", "0:0", "--checkpoint", "{tmp}/scan.pth.tar", "--smooth", "4"],
     "--smooth do.* not apply to --checkpoint"),
    (["--pairs", "0:0", "--checkpoint", "{tmp}/scan.pth.tar", "--head", "scan"], "not both"),
])
def test_command_mistakes_give_one_line_exit_2_and_no_file(split, capsys, extra, match):
    _, tmp = split
    np.save(tmp / "bad_boxes.npy", np.zeros((3, 4)))
    save_scan_checkpoint(tmp / "scan.pth.tar", scan_opt(cross_attn="i2t"))
    (tmp / "short_ids.txt").write_text("1 2\n" * 15)
    rc = _run(tmp, *[a.replace("{tmp}", str(tmp)) for a in extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("rcar-fast attention: error:")
    assert __import__("re").search(match, err), err
    assert not (tmp / "out").exists() or os.listdir(tmp / "out") == []


def test_the_command_offers_every_head_and_the_default_colormap():
    parser = cli.build_parser()
    base = ["attention", "--embeddings", "emb", "--pairs", "0:0", "--out", "out"]
    assert parser.parse_args(base).cmap == attention.DEFAULT_CMAP
    for name in attention.HEAD_NAMES:
        assert parser.parse_args(base + ["--head", name]).head == name
