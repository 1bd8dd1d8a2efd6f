"""nn.Modules users put in their models."""
import torch

from rcar_fast import dispatch, validate
from rcar_fast.ops.backend import Inputs
from rcar_fast.reference import RCARHead


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
        if img.shape[2] != self.embed_dim:
            raise ValueError(f"img and cap must have d = embed_dim = {self.embed_dim}, got d = {img.shape[2]}")
        validate.smooth_for(self.smooth, img.dtype, "the head's smooth")
        param = next(self.parameters())
        if param.device != img.device:
            raise ValueError(f"img/cap are on {img.device} but the module's parameters are on {param.device}; "
                             "move one of them")
        impl = dispatch.choose("rcar", backend, Inputs.of_head(self, img, cap, lens))
        return impl.fn(self, img, cap, lens)
