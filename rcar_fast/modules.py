"""nn.Modules users put in their models, and the RCAR head's entry in the head registry
(RcarScorer: rcar_fast.scorers lists it)."""
import torch

from rcar_fast import contract, flops, validate
from rcar_fast.heads import RCARHead
from rcar_fast.ops import backend as op_backend
from rcar_fast.ops import rcar
from rcar_fast.ops.backend import Inputs
from rcar_fast.ops.scorer import Scorer


class RCARSimilarity(RCARHead):
    """The RCAR similarity head (official `EncoderSimilarity` parameter names, so an official
    checkpoint's `sim_enc` state dict loads) scoring every (image, caption) pair on the chosen
    backend.

    RCARSimilarity(embed_dim=1024, sim_dim=256, regulator="coop_rcar", steps=2,
                   direction="t2i", smooth=10.0)
    forward(img (n_img, R, d), cap (n_cap, Lmax, d), lens (n_cap,), backend="auto") -> (n_img, n_cap)
    """

    def forward(self, img, cap, lens, backend: str = "auto") -> torch.Tensor:
        validate.choice(backend, "backend", op_backend.REQUESTABLE)
        lens = validate.similarity_inputs(img, cap, lens)
        validate.head_fits(self, img)
        impl = op_backend.choose("rcar", rcar.BACKENDS["rcar"], backend, Inputs.of_head(self, img, cap, lens))
        return impl.fn(self, img, cap, lens)


class RcarScorer(Scorer):
    """The RCAR head as a head of the registry: a module head (its settings and weights are
    the module's; RCARSimilarity or a plain reference RCARHead), the ops "rcar" and
    "rcar_pairs". A head in training mode keeps backend="auto" off the forward-only kernels
    (Inputs.of_head)."""
    name, title = "rcar", "RCAR"
    all_pairs_op, pairs_op = "rcar", "rcar_pairs"
    backends = rcar.BACKENDS
    module_type = RCARHead

    @classmethod
    def check_module(cls, model, img) -> None:
        validate.head_fits(model, img)

    @classmethod
    def inputs(cls, model, settings, img, cap, lens) -> Inputs:
        return Inputs.of_head(model, img, cap, lens)

    @classmethod
    def call_all_pairs(cls, impl, model, settings, img, cap, lens):
        return impl.fn(model, img, cap, lens)

    @classmethod
    def call_pairs(cls, impl, model, settings, img, cap, lens, img_idx, cap_idx):
        return impl.fn(model, img, cap, lens, img_idx, cap_idx)

    @classmethod
    def forward_flops(cls, model, settings, n_img, lens, regions, d) -> float:
        return flops.rcar_forward(n_img, lens, regions, d, model.sim_dim, model.regulator,
                                  model.steps, model.direction)

    @classmethod
    def pair_flops(cls, model, settings, pair_lens, regions, d) -> float:
        return flops.rcar_pairs_forward(pair_lens, regions, d, model.sim_dim, model.regulator,
                                        model.steps, model.direction)

    @classmethod
    def build(cls, name, embed_dim, options):
        """An RCARSimilarity at the published settings (coop_rcar, 2 steps, smooth 10 / 3 by
        direction) unless given; options["dropout"] sets every Dropout's p."""
        def given(key, default):
            return default if options.get(key) is None else options[key]

        direction = given("direction", "t2i")
        head = RCARSimilarity(
            embed_dim=embed_dim, sim_dim=given("sim_dim", 256),
            regulator=given("regulator", contract.RCAR_PUBLISHED["regulator"]),
            steps=given("steps", contract.RCAR_PUBLISHED["steps"]), direction=direction,
            smooth=given("smooth", contract.rcar_smooth(direction)))
        if options.get("dropout") is not None:
            for module in head.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = float(options["dropout"])
        return head, {}

    @classmethod
    def vectorized_reference(cls, model, settings):
        return model.forward_vectorized

    @classmethod
    def describe(cls, model, settings) -> str:
        return f"RCAR({model.regulator}{model.steps}, {model.direction})"
