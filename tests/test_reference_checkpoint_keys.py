"""Official RCAR `sim_enc` state dicts load strictly into RCARHead.

The key lists below are written out by hand from Paranioar/RCAR lib/encoders.py
(EncoderSimilarity: sim_eval_w; rar_modules[i] = Aggregation_regulator with rar_q_w / rar_k_w =
Sequential(Linear, Tanh, Dropout), rar_v_w = Sequential(Linear); rcr_modules[j] =
Correpondence_regulator with rcr_smooth_w / rcr_matrix_w = Sequential(Linear, Tanh, Linear);
alv_modules[m] = Alignment_vector with sim_transform_w = Linear), not generated from RCARHead.
"""
import pytest
import torch

from rcar_fast import reference as ref
from tests.tolerances import assert_bit_equal

D, S = 16, 8   # embed_dim, sim_dim

RAR_0 = ["rar_modules.0.rar_q_w.0.weight", "rar_modules.0.rar_q_w.0.bias",
         "rar_modules.0.rar_k_w.0.weight", "rar_modules.0.rar_k_w.0.bias",
         "rar_modules.0.rar_v_w.0.weight", "rar_modules.0.rar_v_w.0.bias"]
RAR_1 = ["rar_modules.1.rar_q_w.0.weight", "rar_modules.1.rar_q_w.0.bias",
         "rar_modules.1.rar_k_w.0.weight", "rar_modules.1.rar_k_w.0.bias",
         "rar_modules.1.rar_v_w.0.weight", "rar_modules.1.rar_v_w.0.bias"]
RCR_0 = ["rcr_modules.0.rcr_smooth_w.0.weight", "rcr_modules.0.rcr_smooth_w.0.bias",
         "rcr_modules.0.rcr_smooth_w.2.weight", "rcr_modules.0.rcr_smooth_w.2.bias",
         "rcr_modules.0.rcr_matrix_w.0.weight", "rcr_modules.0.rcr_matrix_w.0.bias",
         "rcr_modules.0.rcr_matrix_w.2.weight", "rcr_modules.0.rcr_matrix_w.2.bias"]
RCR_1 = ["rcr_modules.1.rcr_smooth_w.0.weight", "rcr_modules.1.rcr_smooth_w.0.bias",
         "rcr_modules.1.rcr_smooth_w.2.weight", "rcr_modules.1.rcr_smooth_w.2.bias",
         "rcr_modules.1.rcr_matrix_w.0.weight", "rcr_modules.1.rcr_matrix_w.0.bias",
         "rcr_modules.1.rcr_matrix_w.2.weight", "rcr_modules.1.rcr_matrix_w.2.bias"]
ALV_0 = ["alv_modules.0.sim_transform_w.weight", "alv_modules.0.sim_transform_w.bias"]
ALV_1 = ["alv_modules.1.sim_transform_w.weight", "alv_modules.1.sim_transform_w.bias"]
EVAL = ["sim_eval_w.weight", "sim_eval_w.bias"]

OFFICIAL_KEYS = {
    ("coop_rcar", 2): EVAL + RAR_0 + RAR_1 + RCR_0 + ALV_0 + ALV_1,
    ("only_rcr", 2): EVAL + RCR_0 + RCR_1 + ALV_0 + ALV_1,
    ("only_rar", 2): EVAL + RAR_0 + RAR_1 + ALV_0,
}

# Shapes of nn.Linear(in, out): weight (out, in), bias (out,).
LAYER_SHAPES = {
    "sim_eval_w": (S, 1), "rar_q_w.0": (S, S), "rar_k_w.0": (S, S), "rar_v_w.0": (S, 1),
    "rcr_smooth_w.0": (S, S // 2), "rcr_smooth_w.2": (S // 2, 1),
    "rcr_matrix_w.0": (S, 2 * S), "rcr_matrix_w.2": (2 * S, D), "sim_transform_w": (D, S),
}


def official_state(regulator, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key in OFFICIAL_KEYS[(regulator, steps)]:
        layer, kind = key.rsplit(".", 1)
        fan_in, fan_out = next(v for k, v in LAYER_SHAPES.items() if layer.endswith(k))
        shape = (fan_out, fan_in) if kind == "weight" else (fan_out,)
        state[key] = torch.randn(shape, generator=gen)
    return state


@pytest.mark.parametrize("regulator,steps", list(OFFICIAL_KEYS))
def test_head_has_exactly_the_official_keys(regulator, steps):
    head = ref.RCARHead(D, S, regulator, steps)
    assert sorted(head.state_dict()) == sorted(OFFICIAL_KEYS[(regulator, steps)])


@pytest.mark.parametrize("regulator,steps", list(OFFICIAL_KEYS))
@pytest.mark.parametrize("prefix", ["", "sim_enc.", "module.sim_enc.", "checkpoint"])
def test_official_state_dict_loads_strictly(regulator, steps, prefix):
    state = official_state(regulator, steps)
    if prefix == "checkpoint":
        # A whole torch.load-ed checkpoint: {"model": DataParallel state dict, "opt", "epoch"}.
        model = {"module.sim_enc." + k: v for k, v in state.items()}
        model["module.img_enc.fc.weight"] = torch.zeros(D, 4)
        model["module.txt_enc.embed.weight"] = torch.zeros(10, 4)
        given = {"model": model, "opt": None, "epoch": 3}
    else:
        given = {prefix + k: v for k, v in state.items()}
        if prefix:
            given[prefix.replace("sim_enc", "img_enc") + "fc.bias"] = torch.zeros(D)
    head = ref.RCARHead(D, S, regulator, steps)
    head.load_official_state_dict(given)
    loaded = head.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # Plain torch loading of the bare dict agrees (strict).
    other = ref.RCARHead(D, S, regulator, steps)
    other.load_state_dict(state, strict=True)
    img, cap = torch.randn(2, 3, D), torch.randn(2, 4, D)
    with torch.no_grad():
        assert_bit_equal(head.eval()(img, cap, [4, 2]), other.eval()(img, cap, [4, 2]))


def test_wrong_step_count_names_the_missing_keys():
    head = ref.RCARHead(D, S, "coop_rcar", 3)
    with pytest.raises(ValueError, match=r"missing keys: .*alv_modules\.2\.sim_transform_w\.weight"):
        head.load_official_state_dict(official_state("coop_rcar", 2))


def test_wrong_regulator_names_the_unexpected_keys():
    head = ref.RCARHead(D, S, "only_rar", 2)
    with pytest.raises(ValueError, match=r"unexpected keys: .*rcr_modules\.0\.rcr_matrix_w\.0\.bias"):
        head.load_official_state_dict({"module.sim_enc." + k: v
                                       for k, v in official_state("coop_rcar", 2).items()})


def test_wrong_dimensions_name_the_mis_shaped_keys():
    head = ref.RCARHead(2 * D, S, "coop_rcar", 2)
    with pytest.raises(ValueError, match=r"shape mismatches: .*alv_modules\.0\.sim_transform_w\.weight"):
        head.load_official_state_dict(official_state("coop_rcar", 2))


def test_non_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="state"):
        ref.RCARHead(D, S).load_official_state_dict([1, 2])
