"""The head registry: every similarity head family the consumers know, in one tuple.

SCORERS below is the whole registry (nothing registers on import). Each entry is a
rcar_fast.ops.scorer.Scorer subclass written beside its head's op: the facts the consumers
read (names and presets, the dispatch ops, keyword defaults and their validation, the
backend Inputs, how to call the all-pairs and pair-list backends, the FLOP model, how to
build a model for the trainer and the benchmarks, labels). The consumers never branch on a
head's name:

    rcar_fast.pairs         score_pairs / all_pairs_scores      (scoring(model, kwargs, img))
    rcar_fast.losses        hardest_negative_loss, full_hardest_negative_loss (through pairs)
    rcar_fast.evaluation    as_similarity_fn / head_fn (all_pairs, all_pairs_topk)
    rcar_fast.cli           eval --embeddings --head NAME; a checkpoint's head; --backend
    rcar_fast.train         --head NAME (the example trainer; examples/ are front ends)
    bench/                  cases name a head and its options; suite and FLOPs ask the scorer

Adding (a) a head that reuses the region-word tile. The head-specific files, as this tree
is laid out (the S-only heads of issue 14 are the worked example, "maxsim"):
  1. rcar_fast/reference_heads.py      its float64 reference (vectorised and per-pair loop)
  2. rcar_fast/ops/maxsim.py           the public wrapper and its Scorer (MaxsimScorer)
  3. rcar_fast/ops/maxsim_reference.py, maxsim_cpu.py, maxsim_triton.py, maxsim_cuda.py:
                                       one Backend class per backend (4 files)
  4. rcar_fast/ops/library.py          its torch.library custom op (define_maxsim_op)
  5. rcar_fast/dispatch.py             TABLE["maxsim"], TABLE["maxsim_pairs"]
  6. kernels/maxsim.py, csrc/cpu/maxsim.cpp, csrc/cuda/maxsim.cu: the epilogues on the
     shared tile (3 files), and their bindings (csrc/bindings.cpp, csrc/cpu/kernels.h,
     csrc/cuda/kernels.h, setup.py's source list: 4 files)
  7. rcar_fast/contract.py (+ the generated csrc/contract.h) when it adds options
  8. this module                       one line: its Scorer in SCORERS
  9. tests: tests/test_maxsim_*.py, tests/maxsim_cases.py, tests/tolerances.py entries,
     tests/test_layering.py (the new modules placed in LAYERS)
  The consumers above are touched by none of it (0 of the 8 files issue 13 counts against:
  pairs, losses, evaluation, cli, train, bench/suite, bench/flops, bench/cases were 8
  places; now the one line in 8.). What keeps (a) over 8 files is the per-backend layout,
  not the consumers: 4 backend modules instead of one <head>_backends.py, and the native
  code's 3 binding files per kernel (a kernels.h declaration per side, a bindings.cpp
  entry) plus setup.py's explicit source list. With one backends module per head (as
  ops/gram_backends.py, ops/pair_backends.py do) and the custom op defined in it, a head
  with reference + Triton kernels only is 6 files: reference_heads.py, ops/<head>.py,
  ops/<head>_backends.py, kernels/<head>.py, dispatch.py, this module (+ its test).

Adding (b) a backend ("foo") of an existing op: kernels/foo.py (or its csrc/ file and its
  binding), rcar_fast/ops/<op>_foo.py (the Backend class; a backend new to the project
  overrides Backend.environment there), rcar_fast/dispatch.py (TABLE, AUTO_ORDER),
  tests/test_<op>_foo.py: 4 files (5 with native code: the binding). The CLI's --backend
  choices, the trainer's, backends() and the benchmarks all read dispatch.

Adding (c) a benchmark case: bench/cases.py only (an OpSpec naming a head of SCORERS and
  its options, in a plan); the suite asks the head's scorer for the model, the call, the
  compile baseline and the FLOPs.
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
