"""nn.Modules users put in their models."""
import torch

from rcar_fast import dispatch, validate
from rcar_fast.heads import RCARHead
from rcar_fast.ops.backend import Inputs


class RCARSimilarity(RCARHead):
    """The RCAR similarity head (official `EncoderSimilarity` parameter names, so an official
    checkpoint's `sim_enc` state dict loads) scoring every (image, caption) pair on the chosen
    backend.

    RCARSimilarity(embed_dim=1024, sim_dim=256, regulator="coop_rcar", steps=2,
                   direction="t2i", smooth=10.0)
    forward(img (n_img, R, d), cap (n_cap, Lmax, d), lens (n_cap,), backend="auto") -> (n_img, n_cap)
    """

    def forward(self, img, cap, lens, backend: str = "auto") -> torch.Tensor:
        validate.choice(backend, "backend", dispatch.REQUESTABLE)
        lens = validate.similarity_inputs(img, cap, lens)
        validate.head_fits(self, img)
        impl = dispatch.choose("rcar", backend, Inputs.of_head(self, img, cap, lens))
        return impl.fn(self, img, cap, lens)
