"""What the suite measures: ops, shapes and the plans (tiny, quick, full; rcar: issue 15's RCAR
rows).

An op row is (op, mode, shape, dtype, backend); a loss row compares the hardest-negative
loss computed sparsely (rcar_fast.losses.hardest_negative_loss: <= 3B pairs with autograd)
against the full B x B version, per backend. Shapes are ordered small to large inside a sweep
so that a backend over the time budget at one size is skipped at the larger ones.

Sweeps (the `sweep` column): "pairs" (n_img x n_cap at the default length, d and dtype),
"len" (mean caption length), "dim" (d), "dtype", "batch" (loss rows: B), "coco5k" (the COCO
5K test shape: 5,000 images x 25,000 captions with COCO-like caption lengths).

Caption lengths (the `lengths` column): "uniform" draws them uniformly in
[ceil(L/2), ceil(3L/2)] (mean L); "coco" draws 8 + Geometric(p = 2/9), clipped at 50
(`coco_lengths`): COCO captions have at least 8 words, a median of 10 and a long thin tail;
this gives mode 8, median 10, mean ~11.5, 90th / 99th percentile 17 / 26 and a maximum of 50
over 25,000 captions.

Inputs are generated on the benchmark's device in the row's dtype (a seeded device
generator), never in float64 on the CPU and copied over: at the COCO 5K shape that copy
alone would cost more than the kernels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from rcar_fast import scorers

MODES = ("forward", "backward", "train_step")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A head to measure: its row label, its name in the head registry (rcar_fast.scorers:
    the scorer builds the model, makes the call, the compile baseline and the FLOPs) and its
    build options (Scorer.build: direction, smooth, sim_dim, regulator, steps, or the head's
    own keywords) as (key, value) pairs. A new case names a head and options; nothing else
    in bench/ changes."""
    name: str                    # row label, e.g. "scan_t2i", "rcar_coop_rcar2_t2i"
    family: str                  # the head's name in rcar_fast.scorers ("scan", "rcar", ...)
    options: tuple = ()

    @property
    def scorer(self):
        return scorers.get(self.family)

    @property
    def dispatch_op(self) -> str:
        return self.scorer.all_pairs_op

    @property
    def pairs_op(self) -> str:
        return self.scorer.pairs_op

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @property
    def direction(self) -> str:
        return self.option("direction", "t2i")

    @property
    def sim_dim(self) -> int:
        return self.option("sim_dim", 0)

    def build(self, embed_dim: Optional[int]) -> tuple:
        """(model, keyword settings) of this head (Scorer.build); embed_dim matters only for
        heads with weights."""
        return self.scorer.build(self.family, embed_dim, dict(self.options))

    def scan_kwargs(self) -> dict:
        """The keyword settings of a head without weights ({} for a module head)."""
        return {} if self.scorer.module_type is not None else self.build(None)[1]


def scan_op(direction: str) -> OpSpec:
    # Published SCAN settings: t2i smooth 9, i2t smooth 4 (mean aggregation, "AVG").
    return OpSpec(f"scan_{direction}", "scan",
                  (("direction", direction), ("smooth", 9.0 if direction == "t2i" else 4.0)))


def rcar_op(regulator: str, steps: int, direction: str, sim_dim: int) -> OpSpec:
    # smooth: the published 10 (t2i) / 3 (i2t), the scorer's default.
    return OpSpec(f"rcar_{regulator}{steps}_{direction}", "rcar",
                  (("direction", direction), ("regulator", regulator), ("steps", steps),
                   ("sim_dim", sim_dim)))


@dataclasses.dataclass(frozen=True)
class Shape:
    n_img: int
    n_cap: int
    regions: int
    mean_len: int
    d: int
    dtype: torch.dtype
    sweep: str = "pairs"
    lengths: str = "uniform"     # caption length distribution: "uniform" or "coco"

    @property
    def pairs(self) -> int:
        return self.n_img * self.n_cap


@dataclasses.dataclass(frozen=True)
class OpCase:
    op: OpSpec
    modes: tuple
    shapes: tuple


@dataclasses.dataclass(frozen=True)
class LossCase:
    op: OpSpec
    shapes: tuple                # n_img = n_cap = B


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    op_cases: tuple
    loss_cases: tuple
    budget_s: float              # timing budget of one row (repeats adapt to it)
    min_repeats: int
    max_repeats: int
    skip_after_s: float          # a backend whose call took longer is skipped at larger shapes
    compile: Optional[str]       # None: include torch.compile; else the reason it is skipped
    # Baseline -> largest n_img x n_cap it is measured at (the slow baselines only where they
    # take seconds, not minutes); larger rows are skipped with the reason.
    baseline_max_pairs: tuple = ()
    single_call_over_s: Optional[float] = None   # measure_call's single_over_s
    warmup_only_over_s: Optional[float] = None   # measure_call's warmup_only_over_s

    def baseline_limit(self, backend: str) -> Optional[int]:
        return dict(self.baseline_max_pairs).get(backend)


def _pairs_sweep(sizes, R, L, d, dtype, sweep="pairs"):
    return tuple(Shape(n_img, n_cap, R, L, d, dtype, sweep) for n_img, n_cap in sizes)


def _batch_sweep(batches, R, L, d, dtype):
    return tuple(Shape(B, B, R, L, d, dtype, "batch") for B in batches)


def tiny_plan() -> Plan:
    """Seconds on a CPU: every code path once, for tests/test_bench_quick.py."""
    f32 = torch.float32
    scan_shapes = _pairs_sweep([(2, 4), (3, 6)], 6, 4, 16, f32)
    rcar = rcar_op("coop_rcar", 2, "t2i", 8)
    return Plan(
        name="tiny",
        op_cases=(OpCase(scan_op("t2i"), MODES, scan_shapes),
                  OpCase(scan_op("i2t"), MODES, scan_shapes[:1]),
                  OpCase(rcar, MODES, _pairs_sweep([(2, 4)], 6, 4, 16, f32)),
                  OpCase(OpSpec("maxsim_chan_t2i", "chan"), MODES, scan_shapes[:1])),
        loss_cases=(LossCase(scan_op("t2i"), _batch_sweep([6], 6, 4, 16, f32)),
                    # B = 2: under the interpreter the triton row recomputes its 4 pairs
                    # on the Triton pair kernels at ~1 s per pair backward
                    LossCase(rcar, _batch_sweep([2], 6, 4, 16, f32)),
                    LossCase(OpSpec("maxsim_aladin_t2i", "aladin"), _batch_sweep([4], 6, 4, 16, f32))),
        budget_s=0.0, min_repeats=1, max_repeats=1, skip_after_s=30.0,
        compile="tiny mode: torch.compile takes about a minute per shape on a CPU")


def quick_plan(device: torch.device) -> Plan:
    """A few minutes on a 2-core CPU: R = 36 and L = 12 as published, d = 256 (d = 1024 in
    the "dim" sweep) and small pair counts, so that the loop baselines stay affordable."""
    f32, R, L, d = torch.float32, 36, 12, 256
    rcar = rcar_op("coop_rcar", 2, "t2i", 64)
    pair_sizes = [(4, 20), (8, 40), (16, 80), (32, 160)]
    mid = (8, 40)
    extras = (_pairs_sweep([mid], R, 6, d, f32, "len") + _pairs_sweep([mid], R, 24, d, f32, "len")
              + _pairs_sweep([mid], R, L, 1024, f32, "dim")
              + _pairs_sweep([mid], R, L, d, torch.bfloat16, "dtype"))
    compile_reason = None
    if device.type == "cpu":
        compile_reason = ("quick mode on CPU: torch.compile of the reference takes about a minute "
                          "per shape on a 2-core CPU; run with --compile to include it")
    return Plan(
        name="quick",
        op_cases=(OpCase(scan_op("t2i"), MODES, _pairs_sweep(pair_sizes, R, L, d, f32)),
                  OpCase(scan_op("t2i"), ("forward",), extras),
                  OpCase(scan_op("i2t"), MODES, _pairs_sweep(pair_sizes, R, L, d, f32)),
                  OpCase(rcar, MODES, _pairs_sweep([(2, 10), (4, 20), (8, 40)], R, L, d, f32)),
                  OpCase(rcar_op("only_rar", 2, "t2i", 64), ("forward",),
                         _pairs_sweep([(4, 20)], R, L, d, f32)),
                  OpCase(rcar_op("only_rcr", 2, "t2i", 64), ("forward",),
                         _pairs_sweep([(4, 20)], R, L, d, f32)),
                  # The S-only heads (issue 14): ALADIN's MrSw and LAPS's both-way max-mean.
                  OpCase(OpSpec("maxsim_aladin_t2i", "aladin"), MODES,
                         _pairs_sweep(pair_sizes, R, L, d, f32)),
                  OpCase(OpSpec("maxsim_laps_both", "laps"), ("forward",),
                         _pairs_sweep([mid], R, L, d, f32))),
        loss_cases=(LossCase(scan_op("t2i"), _batch_sweep([16, 32, 64], R, L, d, f32)),
                    LossCase(rcar, _batch_sweep([8, 16, 32], R, L, d, f32))),
        budget_s=0.5, min_repeats=1, max_repeats=10, skip_after_s=10.0,
        compile=compile_reason)


def rcar_plan(device: torch.device) -> Plan:
    """Issue 15's RCAR rows: coop_rcar(2) t2i at the published sizes (d = 1024, sim_dim 256,
    R = 36, mean caption length 12): forward, backward and train step at 8 x 40 pairs, and the
    training step of the full (B x B with autograd) and sparse (hardest_negative_loss)
    hardest-negative loss at B = 32, on every backend here against the vectorised reference,
    its torch.compile and the public loop (op rows only). About 15-30 minutes on a 2-core CPU,
    mostly the baselines (compiling the reference's backward takes minutes there)."""
    f32, R, L, d = torch.float32, 36, 12, 1024
    rcar = rcar_op("coop_rcar", 2, "t2i", 256)
    return Plan(
        name="rcar",
        op_cases=(OpCase(rcar, MODES, _pairs_sweep([(8, 40)], R, L, d, f32)),),
        loss_cases=(LossCase(rcar, _batch_sweep([32], R, L, d, f32)),),
        budget_s=2.0, min_repeats=1, max_repeats=5, skip_after_s=300.0, compile=None,
        # The public loop takes ~40 s for the 320 pairs' forward on a loaded 2-core CPU: its
        # loss rows (1024 pairs, with autograd) would take most of the run.
        baseline_max_pairs=(("reference_loop", 8 * 40),))


def full_plan(device: torch.device) -> Plan:
    """The GPU suite: COCO-sized sweeps in fp32 and bf16, loss at B = 128 and 256."""
    R, L, d = 36, 12, 1024
    f32, bf16 = torch.float32, torch.bfloat16
    scan_sizes = [(128, 640), (256, 1280), (512, 2560), (1000, 5000)]
    rcar_sizes = [(32, 160), (64, 320), (128, 640), (256, 1280)]
    mid = (256, 1280)
    scan_extras = (_pairs_sweep([mid], R, 6, d, f32, "len") + _pairs_sweep([mid], R, 24, d, f32, "len")
                   + _pairs_sweep([mid], R, L, 256, f32, "dim") + _pairs_sweep([mid], R, L, 512, f32, "dim")
                   + _pairs_sweep([mid], R, L, d, torch.float16, "dtype"))
    op_cases = []
    for direction in ("t2i", "i2t"):
        op_cases.append(OpCase(scan_op(direction), MODES,
                               _pairs_sweep(scan_sizes, R, L, d, f32)
                               + _pairs_sweep(scan_sizes, R, L, d, bf16, "dtype")))
    op_cases.append(OpCase(scan_op("t2i"), ("forward", "train_step"), scan_extras))
    for direction in ("t2i", "i2t"):
        rcar = rcar_op("coop_rcar", 2, direction, 256)
        op_cases.append(OpCase(rcar, MODES, _pairs_sweep(rcar_sizes, R, L, d, f32)
                               + _pairs_sweep(rcar_sizes, R, L, d, bf16, "dtype")))
    for regulator in ("only_rar", "only_rcr"):
        op_cases.append(OpCase(rcar_op(regulator, 2, "t2i", 256), ("forward", "train_step"),
                               _pairs_sweep([(64, 320)], R, L, d, f32)))
    # The COCO 5K test shape (inference only: a backward over 125M pairs is not a use case).
    for direction in ("t2i", "i2t"):
        op_cases.append(OpCase(scan_op(direction), ("forward",), tuple(
            Shape(5000, 25000, R, L, d, dtype, "coco5k", "coco") for dtype in (bf16, f32))))
    return Plan(
        name="full",
        op_cases=tuple(op_cases),
        loss_cases=(LossCase(scan_op("t2i"), _batch_sweep([128, 256], R, L, d, f32)),
                    LossCase(rcar_op("coop_rcar", 2, "t2i", 256), _batch_sweep([128, 256], R, L, d, f32))),
        budget_s=1.0, min_repeats=3, max_repeats=100, skip_after_s=30.0,
        compile=None if device.type == "cuda" else
        "full mode on CPU: torch.compile skipped unless --compile is given",
        baseline_max_pairs=(("reference_loop", 128 * 640), ("reference_compile", 256 * 1280),
                            ("reference", 512 * 2560)))


def coco_lengths(n: int, generator: torch.Generator, shortest: int = 8, longest: int = 50,
                 p: float = 2.0 / 9.0) -> torch.Tensor:
    """n caption lengths drawn like COCO's: shortest + Geometric(p) words, clipped at longest
    (module doc: mean ~11.5, median 10). int64 on the CPU."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    extra = torch.floor(torch.log1p(-u) / math.log1p(-p))
    return (shortest + extra).clamp(max=longest).to(torch.int64)


def caption_lengths(n_cap: int, mean_len: int, distribution: str = "uniform",
                    seed: int = 0) -> torch.Tensor:
    """(n_cap,) int64 lengths on the CPU (the kernels read them there); same seed, same lengths."""
    gen = torch.Generator().manual_seed(seed)
    if distribution == "coco":
        return coco_lengths(n_cap, gen)
    if distribution != "uniform":
        raise ValueError(f"caption length distribution must be 'uniform' or 'coco', got {distribution!r}")
    lo, hi = max(1, (mean_len + 1) // 2), max(1, (3 * mean_len + 1) // 2)
    return torch.randint(lo, hi + 1, (n_cap,), generator=gen)


def device_inputs(n_img: int, regions: int, lens: torch.Tensor, d: int, dtype: torch.dtype,
                  device: torch.device, seed: int = 0):
    """Encoder-output-like (img, cap) generated on `device` in `dtype`: unit vectors, zeros in
    the caption padding. Normalised in place, so the peak is the two tensors themselves."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lmax = int(lens.max())
    img = torch.randn(n_img, regions, d, generator=gen, device=device, dtype=dtype)
    cap = torch.randn(lens.shape[0], lmax, d, generator=gen, device=device, dtype=dtype)
    img.div_(img.norm(dim=-1, keepdim=True))
    cap.div_(cap.norm(dim=-1, keepdim=True))
    padding = torch.arange(lmax, device=device)[None, :] >= lens.to(device)[:, None]
    cap.masked_fill_(padding.unsqueeze(-1), 0.0)
    return img, cap


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """(img, cap, lens) for a shape, generated on `device` in the shape's dtype (see
    device_inputs and caption_lengths). Same seed and device -> same inputs."""
    lens = caption_lengths(shape.n_cap, shape.mean_len, shape.lengths, seed)
    img, cap = device_inputs(shape.n_img, shape.regions, lens, shape.d, shape.dtype, device, seed)
    return img, cap, lens.to(device)
