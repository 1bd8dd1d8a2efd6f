"""The reference in three parts (rcar_fast.reference_math, heads, checkpoint_keys) behind one
namespace (rcar_fast.reference), and its one pair driver per form.

* rcar_fast.reference only re-exports: each of its names is the very object of the module
  that defines it, and no module of the package imports it (the package imports the part it
  needs, so a production import never loads the test namespace);
* pairs_loop / pairs_vectorized on listed pairs (img_idx, cap_idx) give the all-pairs matrix
  at those pairs (repeats, any order, ragged lengths, NaN padding), for SCAN in both
  directions and for an RCAR head, with the gradients of the gathered matrix.
"""
import pytest
import torch

from rcar_fast import checkpoint_keys, heads, reference, reference_math
from tests.test_layering import _tree_sources, imports_of
from tests.tolerances import assert_close_to_reference

F64 = torch.float64


def test_reference_names_are_the_objects_of_their_modules():
    homes = (reference_math, heads, checkpoint_keys)
    for name in reference.__all__:
        owners = [m for m in homes if getattr(m, name, None) is getattr(reference, name)]
        assert owners, f"reference.{name} is not the object of reference_math / heads / checkpoint_keys"
    assert set(reference.__all__) == {n for n in vars(reference) if not n.startswith("_")}


def test_the_package_does_not_import_the_reference_namespace():
    modules, sources = _tree_sources()
    users = sorted({i.importer for name in sources for i in imports_of(name, sources[name], modules)
                    if i.target == "rcar_fast.reference" and i.importer != "rcar_fast.reference"})
    assert users == [], f"import the part you need (reference_math, heads, checkpoint_keys): {users}"


def _inputs(seed=0, n_img=4, n_cap=5, R=3, d=6, lens=(4, 1, 6, 2, 3)):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    img = torch.randn(n_img, R, d, generator=gen, dtype=F64, requires_grad=True)
    cap = torch.randn(n_cap, int(lens.max()), d, generator=gen, dtype=F64)
    for j, n_word in enumerate(lens.tolist()):
        cap[j, n_word:] = float("nan")          # padding must never be read
    return img, cap.requires_grad_(), lens


IMG_IDX = torch.tensor([3, 0, 0, 2, 1, 3, 0])
CAP_IDX = torch.tensor([1, 4, 4, 0, 2, 2, 3])   # a repeated pair, every length


def _pair_fns():
    torch.manual_seed(0)
    head = heads.RCARHead(embed_dim=6, sim_dim=4, regulator="coop_rcar", steps=2).double().eval()
    return {
        "scan_t2i": ("t2i", reference_math.scan_pair_fn("clipped_l2norm", 9.0, "mean", 6.0)),
        "scan_i2t": ("i2t", reference_math.scan_pair_fn("softmax", 4.0, "lse", 6.0)),
        "rcar_t2i": ("t2i", head.pair_scores),
    }


@pytest.mark.parametrize("case", ["scan_t2i", "scan_i2t", "rcar_t2i"])
@pytest.mark.parametrize("driver", [reference_math.pairs_loop, reference_math.pairs_vectorized])
def test_listed_pairs_equal_the_all_pairs_matrix_gathered(case, driver):
    direction, pair_fn = _pair_fns()[case]
    img, cap, lens = _inputs()
    whole = driver(img, cap, lens, direction, pair_fn)
    assert whole.shape == (img.shape[0], cap.shape[0])
    want = whole[IMG_IDX, CAP_IDX]
    grad_want = torch.autograd.grad(want.sum(), (img, cap))
    got = driver(img, cap, lens, direction, pair_fn, IMG_IDX, CAP_IDX)
    assert_close_to_reference(got, want, dtype=F64, what=f"{case} listed pairs")
    for g, w, name in zip(torch.autograd.grad(got.sum(), (img, cap)), grad_want, ("img", "cap")):
        assert_close_to_reference(g, w, dtype=F64, what=f"{case} d/d{name}")


@pytest.mark.parametrize("driver", [reference_math.pairs_loop, reference_math.pairs_vectorized])
def test_an_empty_pair_list_scores_nothing(driver):
    direction, pair_fn = _pair_fns()["scan_t2i"]
    img, cap, lens = _inputs()
    empty = torch.tensor([], dtype=torch.int64)
    assert driver(img, cap, lens, direction, pair_fn, empty, empty).shape == (0,)
