"""The RCAR similarity head's parameter tree (official ``EncoderSimilarity``): submodule and
parameter names, registration order and initialisation follow Paranioar/RCAR
lib/encoders.py, so official ``sim_enc`` state dicts load strictly and a seeded init draws the
same numbers.

The production head (rcar_fast.modules.RCARSimilarity) inherits RCARHead and only changes
which backend scores the pairs; RCARHead's own forms run the reference math
(rcar_fast.reference_math), which reads these parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from rcar_fast import checkpoint_keys, reference_math, validate
from rcar_fast.reference_math import DIRECTIONS, REGULATORS, l2norm


def module_counts(regulator: str, steps: int) -> dict:
    """Numbers of alignment (alv), RCR and RAR modules the official code builds.

    only_rar n: 1, 0, n.  only_rcr n: n, n, 0 (n = 0 is the plain baseline).
    coop_rcar n: n, n-1, n (needs n >= 1: with no step there is no alignment to score).
    """
    validate.choice(regulator, "regulator", REGULATORS)
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"steps must be an integer, got {steps!r}")
    steps = int(steps)
    minimum = 1 if regulator == "coop_rcar" else 0
    if steps < minimum:
        raise ValueError(f"steps must be >= {minimum} for regulator={regulator!r}, got {steps}")
    if regulator == "only_rar":
        return {"alv": 1, "rcr": 0, "rar": steps}
    if regulator == "only_rcr":
        return {"alv": steps, "rcr": steps, "rar": 0}
    return {"alv": steps, "rcr": steps - 1, "rar": steps}


class AggregationRegulator(nn.Module):
    """RAR (official `Aggregation_regulator`): attention-pool the alignment vectors into h."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.rar_q_w = nn.Sequential(nn.Linear(sim_dim, sim_dim), nn.Tanh(), nn.Dropout(0.4))
        self.rar_k_w = nn.Sequential(nn.Linear(sim_dim, sim_dim), nn.Tanh(), nn.Dropout(0.4))
        self.rar_v_w = nn.Sequential(nn.Linear(sim_dim, 1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, mid, hig, query_mask=None, masks=None):
        """mid (..., Q, s), hig (..., s) -> new hig (..., s). masks: None (the Dropout modules
        act), or given dropout scales (keys (..., Q, s), question (..., s)) applied in their
        place (rcar_fast.dropout.counter_masks: the fused kernels' masks)."""
        if masks is None:
            keys, question = self.rar_k_w(mid), self.rar_q_w(hig)
        else:
            keys = self.rar_k_w[1](self.rar_k_w[0](mid)) * masks[0]
            question = self.rar_q_w[1](self.rar_q_w[0](hig)) * masks[1]
        question = question.unsqueeze(-2)
        logits = self.rar_v_w(keys * question).squeeze(-1)
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        weights = self.softmax(logits)
        return l2norm((weights.unsqueeze(-1) * mid).sum(dim=-2))


class CorrespondenceRegulator(nn.Module):
    """RCR (official `Correpondence_regulator`): per-query modulation m and temperature lambda."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.rcr_smooth_w = nn.Sequential(nn.Linear(sim_dim, sim_dim // 2), nn.Tanh(),
                                          nn.Linear(sim_dim // 2, 1))
        self.rcr_matrix_w = nn.Sequential(nn.Linear(sim_dim, sim_dim * 2), nn.Tanh(),
                                          nn.Linear(sim_dim * 2, embed_dim))
        self.tanh = nn.Tanh()
        self.relu = nn.ReLU()

    def forward(self, mid, matrix, smooth):
        """mid (..., Q, s); matrix None (all ones) or (..., Q, d); smooth scalar or (..., Q)."""
        ones = 1.0 if matrix is None else matrix
        matrix = (self.tanh(self.rcr_matrix_w(mid)) + ones).clamp(min=-1, max=1)
        smooth = self.relu(self.rcr_smooth_w(mid).squeeze(-1) + smooth)
        return matrix, smooth


class AlignmentVector(nn.Module):
    """Official `Alignment_vector`: v_k = l2norm(W((q_k - ctx_k)^2)), ctx already l2-normalised."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.sim_transform_w = nn.Linear(embed_dim, sim_dim)

    def forward(self, query, unit_context):
        return l2norm(self.sim_transform_w((query - unit_context).pow(2)))


class RCARHead(nn.Module):
    """RCAR similarity head with the official `EncoderSimilarity` state-dict layout.

    regulator: "only_rar" | "only_rcr" | "coop_rcar"; steps: the official rar_step / rcr_step /
    rcar_step; direction "t2i" (queries are words) or "i2t" (queries are regions); smooth: the
    official t2i_smooth / i2t_smooth. forward() is the vectorised reference form.
    """

    def __init__(self, embed_dim: int = 1024, sim_dim: int = 256, regulator: str = "coop_rcar",
                 steps: int = 2, direction: str = "t2i", smooth: float = 10.0):
        super().__init__()
        validate.choice(direction, "direction", DIRECTIONS)
        counts = module_counts(regulator, steps)
        self.embed_dim, self.sim_dim = int(embed_dim), int(sim_dim)
        self.regulator, self.steps = regulator, int(steps)
        self.direction, self.smooth = direction, smooth
        # Registration order as in the official class (it fixes the order init draws numbers).
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        self.sigmoid = nn.Sigmoid()
        self.rar_modules = nn.ModuleList(
            [AggregationRegulator(sim_dim, embed_dim) for _ in range(counts["rar"])])
        self.rcr_modules = nn.ModuleList(
            [CorrespondenceRegulator(sim_dim, embed_dim) for _ in range(counts["rcr"])])
        self.alv_modules = nn.ModuleList(
            [AlignmentVector(sim_dim, embed_dim) for _ in range(counts["alv"])])
        self.init_weights()

    @property
    def smooth(self) -> float:
        """The softmax temperature lambda of the first attention (official t2i_smooth /
        i2t_smooth): a positive finite number, checked wherever it is set."""
        return self._smooth

    @smooth.setter
    def smooth(self, value) -> None:
        self._smooth = validate.positive_number(value, "smooth")

    def active_dropout(self) -> list:
        """Names of the Dropout modules that act now (training mode, p > 0): RAR's, if any.
        The fused kernels have no dropout and refuse (or are skipped) while this is non-empty."""
        if not self.training:
            return []
        return [name for name, m in self.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]

    def extra_repr(self) -> str:
        return (f"regulator={self.regulator!r}, steps={self.steps}, direction={self.direction!r}, "
                f"smooth={self.smooth}")

    def init_weights(self) -> None:
        """Official init: every Linear weight ~ U(-r, r), r = sqrt(6 / (in + out)); bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = math.sqrt(6.0) / math.sqrt(module.in_features + module.out_features)
                with torch.no_grad():
                    module.weight.uniform_(-bound, bound)
                    if module.bias is not None:
                        module.bias.zero_()

    # ---- the reference math over these parameters -------------------------------------------

    def pair_scores(self, query, context, query_mask=None, context_mask=None):
        """Scores of the pairs described by query (..., Q, d) and context (..., C, d) -> (...)."""
        return reference_math.rcar_pair_scores(self, query, context, query_mask, context_mask)

    def forward_loop(self, img, cap, lens):
        """One caption at a time, like the official forward: (n_img, n_cap)."""
        return reference_math.pairs_loop(img, cap, lens, self.direction, self.pair_scores)

    def forward_vectorized(self, img, cap, lens, img_chunk=None, cap_chunk=None):
        """All pairs in (img_chunk x cap_chunk) blocks with masking: (n_img, n_cap)."""
        return reference_math.pairs_vectorized(img, cap, lens, self.direction, self.pair_scores,
                                               img_chunk=img_chunk, cap_chunk=cap_chunk)

    def forward(self, img, cap, lens):
        return self.forward_vectorized(img, cap, lens)

    # ---- official checkpoints ----------------------------------------------------------------

    def load_official_state_dict(self, state):
        """Load an official sim_enc state dict strictly.

        Accepts a whole checkpoint ({"model": ...}), a model state dict (keys
        "module.sim_enc.*" or "sim_enc.*"; other encoders' keys are ignored) or a bare
        sim_enc state dict. Raises ValueError listing missing/unexpected/mis-shaped keys.
        """
        state = checkpoint_keys.extract_sim_enc_state(state)
        mismatch = checkpoint_keys.state_mismatch(self.state_dict(), state, "head")
        if any(mismatch):
            found = checkpoint_keys.count_official_modules(state)
            raise ValueError(
                f"state dict does not fit RCARHead(regulator={self.regulator!r}, steps={self.steps}, "
                f"embed_dim={self.embed_dim}, sim_dim={self.sim_dim}): the head holds "
                f"{module_counts(self.regulator, self.steps)} modules, the state dict {found}.\n"
                + checkpoint_keys.mismatch_report(*mismatch))
        return self.load_state_dict(state, strict=True)
