"""The head registry (rcar_fast.scorers): one entry per head family, read by every consumer.

* the registry is consistent: names unique, every scorer's ops in dispatch.TABLE;
* the consumers (pairs, losses, evaluation adapters, cli, train, bench suite / cases) never
  compare anything with a head's name (parsed with ast: a new head needs no edit there);
* through the registry, every keyword head (and preset) scores exactly as its own public op
  does, all pairs and pair lists, and a module head as its module does;
* a bad model or keyword is one clear error before any kernel runs.
"""
import ast
import pathlib

import pytest
import torch

from rcar_fast import dispatch, reference, scorers
from rcar_fast.evaluation import all_pairs, head_fn
from rcar_fast.losses import full_hardest_negative_loss, hardest_negative_loss
from rcar_fast.ops.maxsim import MaxsimScorer, max_similarity
from rcar_fast.ops.scan import scan_similarity
from rcar_fast.pairs import all_pairs_scores, score_pairs
from tests.inputs import make_inputs
from tests.tolerances import F64_PAIRS, F64_SPARSE_VS_FULL_LOSS, assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONSUMERS = ("rcar_fast/pairs.py", "rcar_fast/losses.py", "rcar_fast/evaluation/adapters.py",
             "rcar_fast/cli.py", "rcar_fast/train.py", "bench/suite.py", "bench/flops.py",
             "examples/train_scan.py")
F64 = torch.float64
D = 8


def _inputs(n_img=4, n_cap=5, R=3, lens=(5, 2, 1, 4, 3), seed=0, d=D):
    return make_inputs(n_img, n_cap, R, d, lens=lens, seed=seed, dtype=F64, unit_norm=True)


def _rcar_head(seed=0):
    torch.manual_seed(seed)
    return reference.RCARHead(embed_dim=D, sim_dim=4, regulator="coop_rcar", steps=2).double().eval()


def _keyword_names():
    return scorers.names(keyword_only=True)


# ---------------------------------------------------------------------------------------------
# The registry itself
# ---------------------------------------------------------------------------------------------

def test_every_scorer_names_ops_of_the_dispatch_table():
    assert len(set(scorers.names())) == len(scorers.names())
    for scorer in scorers.SCORERS:
        assert scorer.all_pairs_op in dispatch.TABLE, scorer.__name__
        assert scorer.pairs_op in dispatch.TABLE, scorer.__name__
        for name in scorer.names():
            assert scorers.get(name) is scorer


def _compared_strings(path: pathlib.Path):
    """(line, string) of every string constant compared (==, !=, in, not in) with anything,
    except a checkpoint's layout (`.kind`, the checkpoint's format, not a head)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        if isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
            continue
        for operand in [node.left, *node.comparators]:
            for const in ast.walk(operand):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    yield node.lineno, const.value


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_consumers_never_branch_on_a_head_name(consumer):
    heads = set(scorers.names()) | {s.all_pairs_op for s in scorers.SCORERS} | \
        {s.pairs_op for s in scorers.SCORERS}
    found = [(line, text) for line, text in _compared_strings(ROOT / consumer) if text in heads]
    assert not found, f"{consumer} compares with head names at {found}: read the fact from the scorer"


# ---------------------------------------------------------------------------------------------
# Through the registry = the head's own op
# ---------------------------------------------------------------------------------------------

def test_scan_through_the_registry_equals_scan_similarity():
    img, cap, lens = _inputs()
    kw = dict(direction="i2t", smooth=4.0, agg="lse")
    expected = scan_similarity(img, cap, lens, backend="reference", **kw)
    assert_close(all_pairs_scores(img, cap, lens, model="scan", backend="reference", **kw),
                 expected, F64_PAIRS)
    got = all_pairs(img, cap, lens, head_fn("scan", "reference", **kw), img_block=3,
                    cap_block=2, progress=False)
    assert_close(got, expected, F64_PAIRS)


def test_module_head_through_the_registry_equals_the_module():
    img, cap, lens = _inputs()
    head = _rcar_head()
    with torch.no_grad():
        expected = head.forward_vectorized(img, cap, lens)
        assert_close(all_pairs_scores(img, cap, lens, model=head, backend="reference"),
                     expected, F64_PAIRS)
        idx_i, idx_c = torch.tensor([0, 3, 1, 1]), torch.tensor([4, 0, 2, 2])
        assert_close(score_pairs(img, cap, lens, idx_i, idx_c, model=head, backend="reference"),
                     expected[idx_i, idx_c], F64_PAIRS)


@pytest.mark.parametrize("name", scorers.names(keyword_only=True))
def test_every_keyword_head_scores_pairs_as_all_pairs(name):
    img, cap, lens = _inputs(seed=1)
    whole = all_pairs_scores(img, cap, lens, model=name, backend="reference")
    assert whole.shape == (4, 5) and bool(torch.isfinite(whole).all())
    idx_i, idx_c = torch.tensor([0, 3, 1, 1, 2]), torch.tensor([4, 0, 2, 2, 1])
    for backend in ("reference", "reference_loop"):
        assert_close(score_pairs(img, cap, lens, idx_i, idx_c, model=name, backend=backend),
                     whole[idx_i, idx_c], F64_PAIRS)


@pytest.mark.parametrize("name", scorers.names(keyword_only=True))
def test_every_keyword_head_trains_with_the_sparse_loss(name):
    img, cap, lens = _inputs(n_img=5, lens=(5, 2, 1, 4, 3), seed=2)
    grads = []
    for loss_fn in (full_hardest_negative_loss, hardest_negative_loss):
        img_g, cap_g = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
        loss = loss_fn(img_g, cap_g, lens, model=name, backend="reference")
        grads.append((loss.detach(),) + torch.autograd.grad(loss, (img_g, cap_g)))
    for full, sparse in zip(*grads):
        assert_close(sparse, full, F64_SPARSE_VS_FULL_LOSS)


def test_every_scorer_has_a_flop_model_and_a_reference():
    img, cap, lens = _inputs()
    for name in scorers.names():
        scorer = scorers.get(name)
        model, kwargs = scorer.build(name, D, {})
        if isinstance(model, torch.nn.Module):
            model = model.double().eval()
        head = scorers.scoring(model, kwargs, img)
        flops = head.forward_flops(img.shape[0], lens.tolist(), img.shape[1], D)
        # At least the region-word tile: 2 R L d per pair.
        assert flops >= 2.0 * img.shape[0] * img.shape[1] * int(lens.sum()) * D
        assert head.pair_flops([int(lens[0])], img.shape[1], D) > 0
        with torch.no_grad():
            assert_close(head.vectorized_reference()(img, cap, lens),
                         head.all_pairs(img, cap, lens, "reference"), F64_PAIRS)


@pytest.mark.parametrize("preset", sorted(MaxsimScorer.aliases))
def test_a_preset_name_is_maxsim_with_that_preset(preset):
    img, cap, lens = _inputs(seed=3)
    expected = max_similarity(img, cap, lens, preset=preset, backend="reference")
    assert_close(all_pairs_scores(img, cap, lens, model=preset, backend="reference"), expected, F64_PAIRS)
    assert_close(all_pairs_scores(img, cap, lens, model="maxsim", preset=preset, backend="reference"),
                 expected, F64_PAIRS)


def test_vsa_coding_through_the_registry_runs_where_max_similarity_does():
    # The scorer's choice: CHAN's VSA coding only on the reference backends, also under auto.
    img, cap, lens = make_inputs(4, 5, 3, D, lens=(5, 2, 1, 4, 3), seed=4, dtype=F64, pad=0.0)
    kw = dict(direction="i2t", coding="vsa", pool="lse")
    expected = max_similarity(img, cap, lens, backend="reference", **kw)
    assert_close(all_pairs_scores(img, cap, lens, model="maxsim", **kw), expected, F64_PAIRS)
    idx = torch.tensor([0, 3, 2])
    assert_close(score_pairs(img, cap, lens, idx, idx, model="maxsim", **kw), expected[idx, idx],
                 F64_PAIRS)


def test_maxsim_flop_model_is_the_tile_gemm_at_the_coco_shape():
    # COCO-shaped MrSw (issue 14): 2 R L d = 0.885 MFLOP per pair, the maxima and the pool a
    # fraction of a percent on top.
    head = scorers.scoring("aladin")
    per_pair = head.forward_flops(1, [12], 36, 1024) - 3.0 * 1024 * (36 + 12)   # unit norms
    gemm = 2.0 * 36 * 12 * 1024
    assert gemm < per_pair < 1.01 * gemm


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,kwargs,error,match", [
    ("vse", {}, ValueError, "model must be one of"),
    (3, {}, TypeError, "model must be one of"),
    ("rcar", {}, ValueError, "head with weights"),
    ("scan", {"tau": 0.1}, TypeError, "unexpected SCAN keyword"),
    ("scan", {"direction": "both"}, ValueError, "direction"),
    ("chan", {"preset": "laps"}, ValueError, "model='chan' is preset='chan'"),
    ("laps", {"direction": "t2i"}, ValueError, "preset='laps' sets direction='both'"),
    ("maxsim", {"pool": "median"}, ValueError, "pool"),
    ("maxsim", {"smooth": 9.0}, TypeError, "unexpected MaxSim keyword"),
])
def test_bad_models_and_keywords_are_one_clear_error(model, kwargs, error, match):
    img, cap, lens = _inputs()
    with pytest.raises(error, match=match):
        all_pairs_scores(img, cap, lens, model=model, backend="reference", **kwargs)


def test_module_head_refuses_keywords():
    img, cap, lens = _inputs()
    with pytest.raises(TypeError, match="do not apply to an RCAR head"):
        all_pairs_scores(img, cap, lens, model=_rcar_head(), smooth=3.0)
