"""The SCAN Triton kernels' autotune config lists, as the GPU launchers would prune them, and the
RCAR_FAST_AUTOTUNE switch (quick: one config per kernel and bucket; unset: full autotuning).
Runs anywhere: only the prune functions are called, no kernel."""
import pytest
import torch

from rcar_fast.kernels import scan as kernels

TUNERS = {"fwd": kernels._fwd_tuned, "bwd_x": kernels._bwd_x_tuned, "bwd_y": kernels._bwd_y_tuned}
# (C_PAD, Q_PAD) of the COCO buckets: t2i (64 regions x caption buckets 8..64), i2t (caption
# buckets 16..64 x 64 regions)
BUCKETS = [(64, 8), (64, 16), (64, 32), (64, 64), (16, 64), (32, 64)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def kept_configs(name, dtype, c_pad, q_pad):
    tuner = TUNERS[name]
    named = dict(x_ptr=torch.empty(1, dtype=dtype))
    return tuner.early_config_prune(tuner.configs, named, C_PAD=c_pad, Q_PAD=q_pad)


def describe(config):
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TUNERS)
def test_quick_keeps_one_of_the_full_configs(monkeypatch, name, dtype):
    for c_pad, q_pad in BUCKETS:
        monkeypatch.delenv(kernels.AUTOTUNE_VARIABLE, raising=False)
        full = kept_configs(name, dtype, c_pad, q_pad)
        monkeypatch.setenv(kernels.AUTOTUNE_VARIABLE, "quick")
        quick = kept_configs(name, dtype, c_pad, q_pad)
        assert len(quick) == 1, (c_pad, q_pad)
        assert describe(quick[0]) in {describe(c) for c in full}, (c_pad, q_pad)
        # the default pick: the largest tile kept
        area = quick[0].kwargs["BI"] * c_pad * quick[0].kwargs["BJ"] * q_pad
        assert area == max(c.kwargs["BI"] * c_pad * c.kwargs["BJ"] * q_pad for c in full)


def test_full_autotuning_is_the_default_and_keeps_several_configs(monkeypatch):
    monkeypatch.delenv(kernels.AUTOTUNE_VARIABLE, raising=False)
    assert kernels.autotune_mode() == "full"
    assert len(kept_configs("fwd", torch.bfloat16, 64, 16)) > 2
    assert len(kept_configs("bwd_x", torch.bfloat16, 64, 16)) > 2
    monkeypatch.setenv(kernels.AUTOTUNE_VARIABLE, "full")
    assert kernels.autotune_mode() == "full"
    monkeypatch.setenv(kernels.AUTOTUNE_VARIABLE, " Quick ")
    assert kernels.autotune_mode() == "quick"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_tiles_stay_within_the_measured_register_budget(monkeypatch, dtype):
    """The budgets come from the sm_90 compile stats (tests/test_sm90_compile.py): the prunes
    keep no tile beyond them, except the one smallest tile of a bucket whose minimum exceeds
    the budget."""
    monkeypatch.delenv(kernels.AUTOTUNE_VARIABLE, raising=False)
    kind = "fp32" if dtype == torch.float32 else "low"
    for name in TUNERS:
        limits = kernels._LIMITS[("fwd" if name == "fwd" else "bwd", kind)]
        for c_pad, q_pad in BUCKETS:
            configs = kept_configs(name, dtype, c_pad, q_pad)
            assert configs
            for c in configs:
                m, n = c.kwargs["BI"] * c_pad, c.kwargs["BJ"] * q_pad
                smallest = (c.kwargs["BI"], c.kwargs["BJ"]) == kernels._smallest_shape(c_pad, q_pad)
                assert m * n <= limits["max_area"] or (smallest and len(configs) == 1), \
                    (name, c_pad, q_pad, describe(c))
                if kind == "fp32" and name == "fwd":
                    assert c.kwargs["BK"] == kernels._FP32_BK


@pytest.mark.parametrize("value", ["fast", "1", "quik"])
def test_unknown_value_is_refused_before_any_kernel_runs(monkeypatch, value):
    monkeypatch.setenv(kernels.AUTOTUNE_VARIABLE, value)
    img, cap = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match=r"RCAR_FAST_AUTOTUNE=.*'quick'.*'full'"):
        kernels.build_problem(img, cap, torch.tensor([4, 2, 3]), direction="t2i",
                              raw_norm="clipped_l2norm", smooth=9.0, agg="mean", lse_lambda=6.0)
    with pytest.raises(ValueError, match="RCAR_FAST_AUTOTUNE"):
        kept_configs("fwd", torch.bfloat16, 64, 16)
