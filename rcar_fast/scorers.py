"""The head registry: every similarity head family the consumers know, in one tuple.

SCORERS below is the whole registry (nothing registers on import). Each entry is a
rcar_fast.ops.scorer.Scorer subclass written beside its head's op: the facts the consumers
read (names and presets, the ops and their backends, keyword defaults and their validation, the
backend Inputs, how to call the all-pairs and pair-list backends, the FLOP model, how to
build a model for the trainer and the benchmarks, labels). The consumers never branch on a
head's name:

    rcar_fast.pairs         score_pairs / all_pairs_scores      (scoring(model, kwargs, img))
    rcar_fast.losses        hardest_negative_loss, full_hardest_negative_loss (through pairs)
    rcar_fast.evaluation    as_similarity_fn / head_fn (all_pairs, all_pairs_topk)
    rcar_fast.cli           eval --embeddings --head NAME; a checkpoint's head; --backend
    rcar_fast.train         --head NAME (the example trainer; examples/ are front ends)
    bench/                  cases name a head and its options; suite and FLOPs ask the scorer

Adding (a) a head that reuses the region-word tile ("foo"; docs and tests listed apart):
   1. rcar_fast/reference_heads.py   its float64 reference (vectorised and per-pair loop)
   2. rcar_fast/ops/foo.py           the op family's module: its custom ops (torch.library,
                                     on ops/library.py's define), its Backend classes
                                     (reference, reference_loop, cpu, triton, cuda) listed in
                                     BACKENDS, the public wrapper and its Scorer (`backends =
                                     BACKENDS`: dispatch.TABLE takes them from the Scorer)
   3. kernels/foo.py                 Triton epilogue on kernels/tile.py
   4. csrc/cpu/foo.cpp               C++ epilogue on csrc/cpu/tile.h, ending in its own binding
                                     block (RCAR_FAST_BINDINGS, csrc/bindings.h)
   5. csrc/cuda/foo.cu               CUDA epilogue on csrc/cuda/tile.cuh, ending in its host-only
                                     binding block (csrc/cuda/bind.h; no torch header)
   6. rcar_fast/scorers.py           this module: its Scorer in SCORERS
   7. rcar_fast/__init__.py          the public names
  (+ rcar_fast/contract.py only when the head brings new constants; its argument checks are
  validate.py's generic ones (choice, positive_number, temperature, head_inputs...) called
  from ops/foo.py.) 7 files, 8 with new constants; no shared native file (no kernels.h, no
  bindings_*.cpp, no setup.py edit). dispatch.py, pairs.py, losses.py, evaluation/, cli.py, train.py,
  bench/suite.py, bench/flops.py are touched by no head.
  Tests: tests/test_foo_{reference,cpu,triton,cuda}.py (+ named entries in tests/tolerances.py);
  docs: README.md, CHANGELOG.md.

Adding (b) a backend "bar" of an existing op:
  1. its kernel file(s): kernels/bar.py (Triton), or its native unit(s) under csrc/<bar>/
  2. rcar_fast/ops/<op>.py: the Backend class (a backend new to the project overrides
     Backend.environment there), the kernel as a custom op (define_<op>_op), the class in
     BACKENDS
  3. tests/test_<op>_bar.py
  3 files (a native backend's kernel binds itself at its end); a backend NAME new to the project
  adds it to rcar_fast/ops/backend.py (BACKEND_NAMES, and AUTO_ORDER if auto should try
  it): at most 4. The CLI's and the trainer's --backend choices, backends(), auto and the
  benchmark suite all read dispatch, which reads the op modules. Outside the count: a GPU
  backend that the GPU check should measure is also named in bench/gpu_check.py
  (FAST_BACKENDS) and scripts/gpu_correctness.py, and README's backend table documents it.

Adding (c) a benchmark case: bench/cases.py only (an OpSpec naming a head of SCORERS and
  its build options, in a plan; e.g. the maxsim cases there). The suite asks the head's
  scorer for the model, the call, the compile baseline (its vectorised reference) and the
  FLOPs; bench/gpu_check.py's COCO 5K rows iterate over SCORERS (published settings where
  it knows them, a new head at its defaults).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from rcar_fast.encoders import SCANHead
from rcar_fast.modules import RcarScorer
from rcar_fast.ops.maxsim import MaxsimScorer
from rcar_fast.ops.scan import ScanScorer
from rcar_fast.ops.scorer import Scorer, Scoring

__all__ = ["SCORERS", "Scorer", "Scoring", "get", "names", "scoring", "of_module"]

# Every head family, in the order messages and --help list them.
SCORERS: tuple = (ScanScorer, RcarScorer, MaxsimScorer)


def _check_registry() -> dict:
    by_name = {}
    for scorer in SCORERS:
        for name in scorer.names():
            if name in by_name:
                raise ValueError(f"scorers.SCORERS: the name {name!r} is taken by both "
                                 f"{by_name[name].__name__} and {scorer.__name__}")
            by_name[name] = scorer
    return by_name


_BY_NAME = _check_registry()


def names(keyword_only: bool = False) -> tuple:
    """Every name model= / --head take (heads and their presets); keyword_only: only heads
    that need no module (no weights), those a name alone builds for evaluation."""
    return tuple(n for n, s in _BY_NAME.items() if not keyword_only or s.module_type is None)


def get(name: str) -> type:
    """The scorer of a head name (a head or one of its presets)."""
    if name not in _BY_NAME:
        raise ValueError(f"head must be one of {names()}, got {name!r}")
    return _BY_NAME[name]


def _module_kinds() -> str:
    return " or ".join(f"an {s.title} head module ({s.module_type.__name__})"
                       for s in SCORERS if s.module_type is not None)


def of_module(model: torch.nn.Module) -> Optional[tuple]:
    """(scorer, model, keywords) for a module that is a head of the registry, else None.
    A SCAN checkpoint's SCANHead (no weights) stands for model="scan" with its options."""
    if isinstance(model, SCANHead):
        return ScanScorer, ScanScorer.name, model.options()
    for scorer in SCORERS:
        if scorer.takes(model):
            return scorer, model, {}
    return None


def scoring(model, kwargs: Optional[Mapping] = None,
            img: Optional[torch.Tensor] = None) -> Scoring:
    """The Scoring of model= (a head name, a head module) and its keywords, validated for
    img's dtype and size (float32 when img is None). One clear error for anything else."""
    kwargs = dict(kwargs or {})
    expected = f"one of {names(keyword_only=True)} or {_module_kinds()}"
    if isinstance(model, str):
        if model not in _BY_NAME:
            raise ValueError(f"model must be {expected}, got {model!r}")
        scorer = _BY_NAME[model]
        if scorer.module_type is not None:
            raise ValueError(f"model={model!r} is a head with weights: pass the module "
                             f"({scorer.module_type.__name__}), not its name")
    elif isinstance(model, torch.nn.Module) and of_module(model) is not None:
        scorer, model, own = of_module(model)
        if own:   # a module standing for a keyword head: its options, then the call's
            kwargs = {**own, **kwargs}
    else:
        raise TypeError(f"model must be {expected}, got {type(model).__name__}")
    if img is None:
        if isinstance(model, torch.nn.Module):   # checked against the features when called
            return Scoring(scorer, model, scorer.settings(model, kwargs, None, check=False))
        img = torch.empty((0, 0, 0))
    return Scoring(scorer, model, scorer.settings(model, kwargs, img))
