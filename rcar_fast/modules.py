"""nn.Modules users put in their models."""
import torch

from rcar_fast import dispatch, validate
from rcar_fast.heads import RCARHead


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
        impl = dispatch.choose("rcar", backend, img.device, img.dtype, self.mode_rejections())
        return impl.fn(self, img, cap, lens)

    def mode_rejections(self) -> dict[str, str]:
        """Fused backends that cannot serve the head in its current mode, with the reason.

        In training mode a step needs a backward pass, and RAR's dropout (p = 0.4) if the head
        has RAR modules; backend="auto" then falls back to what provides them. In eval mode every
        fused backend serves (a forward-only backend's result raises if differentiated).
        """
        if not self.training:
            return {}
        reasons = {
            "cpu": "training mode needs a backward pass; the C++ CPU RCAR kernel is forward-only",
            "cuda": "training mode needs a backward pass; the CUDA RCAR kernel is forward-only",
        }
        if self.active_dropout():
            reasons["triton"] = "training mode with RAR dropout active; the Triton kernel has no dropout"
        return reasons
