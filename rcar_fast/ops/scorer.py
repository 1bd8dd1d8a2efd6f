"""What a similarity head family tells the code that uses it: the Scorer base class.

A head family (SCAN, RCAR, the S-only max heads) is one Scorer subclass, written in the
head's own op module (rcar_fast/ops/scan.py, rcar_fast/modules.py beside RCARSimilarity,
rcar_fast/ops/maxsim.py) and listed in rcar_fast.scorers.SCORERS. The consumers (pair
scoring and the losses, the evaluation adapters, the CLI, the trainer, the benchmarks) read
these facts from it and never branch on a head's name:

    name, title          what ``model=`` / ``--head`` say ("scan"), how messages name it
    all_pairs_op,        the ops it runs: all pairs (n_img, n_cap) and a pair list (P,)
      pairs_op
    backends             those ops' backend classes (the op module's BACKENDS, which
                         rcar_fast.dispatch.TABLE assembles)
    defaults, aliases    keyword heads: every keyword and its default; other names that
                         stand for it with settings filled in (presets)
    module_type          module heads (weights): the nn.Module class that is the head
    validate             keyword settings checked (one clear error before any kernel)
    inputs, choose       the Inputs a backend judges; the choice (ops.backend.choose)
    call_all_pairs,      how to call a chosen backend's fn
      call_pairs
    forward_flops,       the model FLOPs (rcar_fast.flops), for benchmarks
      pair_flops
    build                a model of this head for an embedding size (trainer, benchmarks)
    vectorized_reference the plain PyTorch function (the torch.compile baseline)
    label, describe      "SCAN t2i" for result tables; every setting, for logs

A ``Scoring`` is one call's head: the scorer, the model (its name, or the module) and the
validated keyword settings; rcar_fast.scorers.scoring() makes it from what a user passed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Mapping, Optional

import torch

from rcar_fast.ops.backend import Inputs, choose


class Scorer:
    """One head family (see the module doc). Subclasses set the class attributes and
    override the hooks; every hook is a classmethod taking (model, settings, ...), where
    model is the name (keyword heads) or the module (module heads)."""
    name: ClassVar[str]
    title: ClassVar[str]
    all_pairs_op: ClassVar[str]
    pairs_op: ClassVar[str]
    backends: ClassVar[Mapping[str, tuple]]   # op -> its backend classes
    defaults: ClassVar[Mapping] = {}
    aliases: ClassVar[Mapping[str, Mapping]] = {}
    module_type: ClassVar[Optional[type]] = None

    # -- which models it takes, and their settings -------------------------------------------

    @classmethod
    def names(cls) -> tuple:
        return (cls.name,) + tuple(cls.aliases)

    @classmethod
    def takes(cls, model) -> bool:
        if isinstance(model, str):
            return model in cls.names()
        return cls.module_type is not None and isinstance(model, cls.module_type)

    @classmethod
    def settings(cls, model, kwargs: Mapping, img: Optional[torch.Tensor],
                 check: bool = True) -> dict:
        """The validated keyword settings of a call with this model and these keywords (a
        module head: checked against img's features unless check=False)."""
        if not isinstance(model, str):
            if kwargs:
                raise TypeError(f"keywords {sorted(kwargs)} do not apply to an {cls.title} head "
                                "(its settings are the module's attributes)")
            if check:
                cls.check_module(model, img)
            return {}
        unknown = set(kwargs) - set(cls.defaults)
        if unknown:
            raise TypeError(f"unexpected {cls.title} keyword(s) {sorted(unknown)}; expected some "
                            f"of {sorted(cls.defaults)}")
        return cls.validate({**cls.defaults, **cls.aliases.get(model, {}), **kwargs}, img.dtype)

    @classmethod
    def validate(cls, kwargs: dict, dtype: torch.dtype) -> dict:
        """Keyword heads: the settings checked and normalised (override)."""
        return kwargs

    @classmethod
    def check_module(cls, model, img: torch.Tensor) -> None:
        """Module heads: the module can score these features (override)."""

    # -- calls ---------------------------------------------------------------------------------

    @classmethod
    def choose(cls, op: str, backend: str, inputs: Inputs, model, settings: dict):
        """The backend class to run (ops.backend.choose among this head's backends of `op`; a
        head whose settings narrow the backends further overrides this)."""
        return choose(op, cls.backends[op], backend, inputs)

    @classmethod
    def inputs(cls, model, settings: dict, img, cap, lens) -> Inputs:
        raise NotImplementedError

    @classmethod
    def call_all_pairs(cls, impl, model, settings: dict, img, cap, lens) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def call_pairs(cls, impl, model, settings: dict, img, cap, lens, img_idx,
                   cap_idx) -> torch.Tensor:
        raise NotImplementedError

    # -- cost, models, labels --------------------------------------------------------------------

    @classmethod
    def forward_flops(cls, model, settings: dict, n_img: int, lens, regions: int,
                      d: int) -> float:
        """Model FLOPs of all n_img x len(lens) pairs (rcar_fast.flops)."""
        raise NotImplementedError

    @classmethod
    def pair_flops(cls, model, settings: dict, pair_lens, regions: int, d: int) -> float:
        """Model FLOPs of a pair list whose captions have these lengths."""
        raise NotImplementedError

    @classmethod
    def build(cls, name: str, embed_dim: int, options: Mapping) -> tuple:
        """(model, keyword settings) of this head for embeddings of size embed_dim. name is
        one of names(); options are the trainer's / benchmark's generic head options
        (direction, smooth, sim_dim, regulator, steps, dropout), None meaning the head's
        default; a head takes those that apply to it. A module comes back in train mode on
        the CPU in float32 (the caller moves it)."""
        raise NotImplementedError

    @classmethod
    def vectorized_reference(cls, model, settings: dict) -> Callable:
        """fn(img, cap, lens) -> (n_img, n_cap): the plain PyTorch form (no validation, no
        dispatch), what the benchmarks compile as a baseline."""
        raise NotImplementedError

    @classmethod
    def label(cls, model, settings: dict) -> str:
        """Title and direction ("SCAN t2i"), for result tables."""
        direction = settings.get("direction") or getattr(model, "direction", "")
        return f"{cls.title} {direction}".strip()

    @classmethod
    def describe(cls, model, settings: dict) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        return f"{cls.title}({shown})"


@dataclasses.dataclass(frozen=True)
class Scoring:
    """One call's head: the scorer, the model (name or module) and its validated settings."""
    scorer: type
    model: object
    settings: dict

    @property
    def module(self) -> Optional[torch.nn.Module]:
        return self.model if isinstance(self.model, torch.nn.Module) else None

    def inputs(self, img, cap, lens) -> Inputs:
        return self.scorer.inputs(self.model, self.settings, img, cap, lens)

    def choose(self, op: str, backend: str, img, cap, lens):
        return self.scorer.choose(op, backend, self.inputs(img, cap, lens), self.model,
                                  self.settings)

    def all_pairs(self, img, cap, lens, backend: str = "auto") -> torch.Tensor:
        """(n_img, n_cap) scores; img, cap, lens validated by the caller."""
        impl = self.choose(self.scorer.all_pairs_op, backend, img, cap, lens)
        return self.scorer.call_all_pairs(impl, self.model, self.settings, img, cap, lens)

    def pairs(self, img, cap, lens, img_idx, cap_idx, backend: str = "auto") -> torch.Tensor:
        """(P,) scores of the listed pairs; everything validated by the caller."""
        impl = self.choose(self.scorer.pairs_op, backend, img, cap, lens)
        return self.scorer.call_pairs(impl, self.model, self.settings, img, cap, lens,
                                      img_idx, cap_idx)

    def forward_flops(self, n_img: int, lens, regions: int, d: int) -> float:
        return self.scorer.forward_flops(self.model, self.settings, n_img, lens, regions, d)

    def pair_flops(self, pair_lens, regions: int, d: int) -> float:
        return self.scorer.pair_flops(self.model, self.settings, pair_lens, regions, d)

    def vectorized_reference(self) -> Callable:
        return self.scorer.vectorized_reference(self.model, self.settings)

    def label(self) -> str:
        return self.scorer.label(self.model, self.settings)

    def describe(self) -> str:
        return self.scorer.describe(self.model, self.settings)
