"""RCAR's encoders with the official state-dict names (Paranioar/RCAR ``lib/encoders.py``), so
an official checkpoint's ``img_enc`` / ``txt_enc`` weights load strictly, and the whole
model (``RCARModel``: img_enc + txt_enc + sim_enc) that ``load_rcar_checkpoint`` builds.

* Image encoder: ``fc: Linear(img_dim, d)`` plus a 2-layer MLP
  (``mlp.layers.{0,1}``, ``mlp.bns.{0,1}``: Linear -> BatchNorm -> ReLU -> Linear; the
  second BatchNorm exists in the state dict but is not applied, as in the public MLP),
  summed, then l2norm over d.
* Text encoder: ``embed: Embedding(vocab, word_dim)`` -> dropout (training only) ->
  ``rnn: GRU(word_dim, d, num_layers, bidirectional)``; the two directions are averaged,
  then l2norm over d. Word positions beyond a caption's length are zeros.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rcar_fast import contract
from rcar_fast.ops.scan import scan_similarity

__all__ = ["l2norm", "MLP", "EncoderImage", "EncoderImagePrecomp", "EncoderText", "RCARModel",
           "SCANHead"]

EPS = contract.EPS


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (||x|| + eps), eps added to the norm as in the public code."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


class MLP(nn.Module):
    """Linear layers with BatchNorm and ReLU between them (the public VSE-infinity MLP)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.output_dim, self.num_layers = output_dim, num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip([input_dim] + hidden, hidden + [output_dim]))
        # One BatchNorm per layer, the last one unused: kept so that official keys match.
        self.bns = nn.ModuleList(nn.BatchNorm1d(n_out) for n_out in hidden + [output_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        return x.reshape(*batch_shape, self.output_dim)


class EncoderImage(nn.Module):
    """Region features (n, R, img_dim) -> region embeddings (n, R, embed_size)."""

    def __init__(self, img_dim: int = 2048, embed_size: int = 1024, no_imgnorm: bool = False):
        super().__init__()
        self.embed_size, self.no_imgnorm = embed_size, no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # official Xavier init of fc
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound)
            self.fc.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.mlp(images) + self.fc(images)
        return features if self.no_imgnorm else l2norm(features)


class EncoderImagePrecomp(nn.Module):
    """SCAN's image encoder (kuanghuei/SCAN ``model.py``): ``fc`` then l2norm, no MLP.
    ``weight_norm=True`` is its ``precomp_enc_type='weight_norm'`` variant (``fc.weight_g``,
    ``fc.weight_v``, built with torch's own weight_norm over the whole matrix, as there)."""

    def __init__(self, img_dim: int = 2048, embed_size: int = 1024, no_imgnorm: bool = False,
                 weight_norm: bool = False):
        super().__init__()
        self.embed_size, self.no_imgnorm = embed_size, no_imgnorm
        fc = nn.Linear(img_dim, embed_size)
        if weight_norm:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)   # deprecated, still the same op
                fc = nn.utils.weight_norm(fc, dim=None)
        self.fc = fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.fc(images)
        return features if self.no_imgnorm else l2norm(features)


class EncoderText(nn.Module):
    """Word ids (n, L) + lengths (n,) -> word embeddings (n, L, embed_size), zero padded."""

    def __init__(self, vocab_size: int, embed_size: int = 1024, word_dim: int = 300,
                 num_layers: int = 1, use_bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.embed_size, self.no_txtnorm, self.use_bi_gru = embed_size, no_txtnorm, use_bi_gru
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(0.4)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=use_bi_gru)
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)

    def forward(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        if ids.dim() != 2 or lengths.shape != (ids.shape[0],):
            raise ValueError(f"ids must be (n, L) and lengths (n,), got {tuple(ids.shape)} and "
                             f"{tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]:
            raise ValueError(f"lengths must lie in [1, {ids.shape[1]}]")
        if int(ids.max()) >= self.embed.num_embeddings or int(ids.min()) < 0:
            raise ValueError(f"word ids must lie in [0, {self.embed.num_embeddings}) "
                             f"(the vocabulary size of the checkpoint), got max {int(ids.max())}")
        words = self.dropout(self.embed(ids))
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        if self.use_bi_gru:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return out if self.no_txtnorm else l2norm(out)


class RCARModel(nn.Module):
    """The official SCANpp layout: ``img_enc``, ``txt_enc``, ``sim_enc`` (an RCAR head)."""

    def __init__(self, img_enc: EncoderImage, txt_enc: EncoderText, sim_enc: nn.Module,
                 opt=None, epoch: Optional[int] = None):
        super().__init__()
        self.img_enc, self.txt_enc, self.sim_enc = img_enc, txt_enc, sim_enc
        self.opt, self.epoch = opt, epoch

    @torch.no_grad()
    def encode_images(self, features, batch_size: int = 128, device=None,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Region features (N, R, img_dim) (tensor or memmap) -> embeddings (N, R, d) on CPU."""
        device = self._device(device)
        out = None
        for i0 in range(0, len(features), batch_size):
            batch = torch.as_tensor(_readable(features[i0:i0 + batch_size]), dtype=torch.float32)
            emb = self.img_enc(batch.to(device))
            if out is None:
                out = torch.empty((len(features),) + tuple(emb.shape[1:]), dtype=out_dtype)
            out[i0:i0 + len(batch)] = emb.to("cpu", out_dtype)
        return out

    @torch.no_grad()
    def encode_captions(self, token_ids: list, batch_size: int = 128, device=None,
                        out_dtype: torch.dtype = torch.float32):
        """Lists of word ids -> (cap (n, Lmax, d) zero-padded, lens (n,)) on CPU. Batches
        are formed in length order (little padding), results go back to the input order."""
        device = self._device(device)
        lens = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
        cap = torch.zeros((len(token_ids), int(lens.max()), self.txt_enc.embed_size),
                          dtype=out_dtype)
        order = torch.argsort(lens, descending=True, stable=True)
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            longest = int(lens[idx].max())
            ids = torch.zeros((len(idx), longest), dtype=torch.int64)
            for row, j in enumerate(idx.tolist()):
                ids[row, :lens[j]] = torch.as_tensor(token_ids[j])
            emb = self.txt_enc(ids.to(device), lens[idx])
            cap[idx, :longest] = emb.to("cpu", out_dtype)
        return cap, lens

    def _device(self, device):
        return torch.device(device) if device is not None else next(self.parameters()).device


def _readable(array):
    """A writable array/tensor view (np.memmap opened read-only is copied block-wise)."""
    import numpy as np

    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return np.array(array)
    return array


class SCANHead(nn.Module):
    """The SCAN similarity of a SCAN checkpoint (no weights): ``rcar_fast.scan_similarity``
    with the checkpoint's direction (cross_attn), raw_feature_norm, lambda_softmax,
    agg_func and lambda_lse."""

    def __init__(self, direction: str = "t2i", raw_norm: str = "clipped_l2norm",
                 smooth: float = 9.0, agg: str = "lse", lse_lambda: float = 6.0):
        super().__init__()
        self.direction, self.raw_norm, self.smooth = direction, raw_norm, smooth
        self.agg, self.lse_lambda = agg, lse_lambda

    def options(self) -> dict:
        return dict(direction=self.direction, raw_norm=self.raw_norm, smooth=self.smooth,
                    agg=self.agg, lse_lambda=self.lse_lambda)

    def forward(self, img, cap, lens, backend: str = "auto"):
        return scan_similarity(img, cap, lens, backend=backend, **self.options())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())
