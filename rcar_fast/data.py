"""Data for retrieval evaluation: the synthetic default set, the SCAN/RCAR precomputed
format, and already-encoded embeddings.

Everything returns / works with the project conventions: images ``(n_img, R, d)``,
captions ``(n_cap, Lmax, d)`` padded, ``lens (n_cap,) int64``, caption ``5i .. 5i+4``
belonging to image ``i``.

Synthetic set (:func:`synthetic`)
---------------------------------
A COCO-shaped stand-in for encoder outputs, so that all-pairs similarity and recall can be
measured without downloading features. The generative story:

* a shared pool of "concept" vectors (objects / attributes), drawn with Zipf-like
  frequencies, so that different images share concepts (as COCO images share "man",
  "table", ...) and retrieval is not trivially easy;
* each image region is a concept plus region-specific jitter;
* each caption word is either a content word, built from one region of its image (or the
  mean of two) plus ``noise``, or (with probability ``function_word_rate``) a function word
  drawn from a small shared set ("a", "the", "on", ...), which carries no information;
* every vector is l2-normalised, like the encoders' outputs.

With the defaults, SCAN t2i retrieval at 1000 images / 5000 captions lands well above
chance but far from perfect (see tests/test_data.py for the range asserted), so rankings
are meaningful.

Determinism: the random draws come from NumPy's PCG64 generator seeded per fixed-size
block of images with ``SeedSequence([seed, block, stream])``. PCG64 and its normal sampler
give the same stream on every platform; the arithmetic runs in float64 and is rounded
once to the requested dtype, so the output is the same on every machine (bit-for-bit
except in the rare case where float64 libm results round differently). Because blocks are
seeded independently and have a fixed size, the first ``n`` images of a bigger set equal a
set made with ``n_images=n`` (a multiple of the block size), whatever the chunking.

Memory: the output is allocated once in ``dtype``; generation works one block of
``SYNTHETIC_BLOCK_IMAGES`` images at a time (a few tens of MB in float64 at d=1024). At the
COCO 5K shape (5000 images x 36 x 1024, 25000 captions, Lmax about 30) the outputs are
about 0.74 GB of image features and about 3 GB of captions in float32, half that in
float16; pass ``dtype=torch.float16`` or a smaller ``dim`` when that is too much.
"""
from __future__ import annotations

import json
import os
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "RetrievalSet",
    "synthetic",
    "SYNTHETIC_SIZES",
    "synthetic_size",
    "Vocabulary",
    "load_vocab",
    "tokenize",
    "PrecompSplit",
    "load_precomp",
    "load_embeddings",
    "save_embeddings",
    "pad_captions",
]

# Images per independently seeded block; part of the definition of the synthetic set
# (changing it changes every output), so it is a constant and not a parameter.
SYNTHETIC_BLOCK_IMAGES = 50
_STREAM_LENS, _STREAM_CONTENT, _STREAM_POOL = 1, 2, 3
_N_FUNCTION_WORDS = 16


class RetrievalSet(NamedTuple):
    """Encoded images and captions of one evaluation split.

    img: (n_img, R, d); cap: (n_cap, Lmax, d), zeros beyond each length; lens: (n_cap,)
    int64. Caption ``k * i .. k * i + k - 1`` belong to image ``i`` with
    ``k = captions_per_image``."""

    img: torch.Tensor
    cap: torch.Tensor
    lens: torch.Tensor

    @property
    def captions_per_image(self) -> int:
        return self.cap.shape[0] // max(self.img.shape[0], 1)

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self)


# Named sizes for the CLI and benchmarks: (n_images, dim). "coco5k" is the full test shape.
SYNTHETIC_SIZES = {
    "tiny": (40, 64),
    "small": (200, 256),
    "demo": (500, 1024),
    "f30k": (1000, 1024),
    "coco1k": (1000, 1024),
    "coco5k": (5000, 1024),
}


def synthetic_size(name: str) -> tuple:
    """(n_images, dim) of a named synthetic size; raises ValueError listing the names."""
    try:
        return SYNTHETIC_SIZES[name]
    except KeyError:
        raise ValueError(
            f"unknown synthetic size {name!r}; expected one of {sorted(SYNTHETIC_SIZES)}"
        ) from None


def _rng(seed: int, block: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, block, stream])))


def _l2norm_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.square(x).sum(axis=-1, keepdims=True))


def _caption_lengths(seed, block, n_caps, min_len, max_len):
    # Right-skewed like real caption lengths: min_len + Gamma(2, 3) words (mean min_len + 6).
    rng = _rng(seed, block, _STREAM_LENS)
    extra = np.rint(rng.gamma(shape=2.0, scale=3.0, size=n_caps))
    return np.clip(min_len + extra, min_len, max_len).astype(np.int64)


def _shared_pool(seed, n_concepts, latent_dim, dim):
    """The parts shared by all blocks: concepts, function words, frequencies, the lift."""
    rng = _rng(seed, 0, _STREAM_POOL)
    concepts = _l2norm_rows(rng.standard_normal((n_concepts, latent_dim)))
    function_words = _l2norm_rows(rng.standard_normal((_N_FUNCTION_WORDS, latent_dim)))
    # Zipf-like concept frequencies: a few frequent objects, a long tail.
    weights = 1.0 / (np.arange(n_concepts) + 10.0)
    # Random Gaussian lift from the latent space to d (near-isometric, no QR so that the
    # result does not depend on the LAPACK build).
    lift = rng.standard_normal((latent_dim, dim)) / np.sqrt(dim)
    return concepts, function_words, weights / weights.sum(), lift


def _gaussian_directions(rng, shape):
    """Gaussian vectors scaled to unit expected norm (variance 1/d per coordinate)."""
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def _lift(rng, latent, lift, isotropic):
    """Latent unit vectors -> unit vectors in d: the lifted latent plus a full-rank part."""
    full = _l2norm_rows(latent @ lift)
    return _l2norm_rows(full + isotropic * _gaussian_directions(rng, full.shape))


def _synthetic_block(seed, block, n_img, lens, pool, cfg):
    """Regions (n_img, R, d) and packed words (sum(lens), d) of one block, float64."""
    concepts, function_words, weights, lift = pool
    rng = _rng(seed, block, _STREAM_CONTENT)
    n_obj, latent_dim = cfg["objects_per_image"], concepts.shape[1]
    # Objects: a concept plus an instance-specific part (this dog, not any dog).
    object_concepts = np.stack([rng.choice(len(concepts), size=n_obj, replace=False, p=weights)
                                for _ in range(n_img)])
    objects = _l2norm_rows(concepts[object_concepts] + cfg["instance_jitter"]
                           * _gaussian_directions(rng, (n_img, n_obj, latent_dim)))
    # Regions: overlapping boxes, several per object, each with its own jitter.
    region_object = rng.integers(0, n_obj, size=(n_img, cfg["regions"]))
    regions = _l2norm_rows(np.take_along_axis(objects, region_object[..., None], axis=1)
                           + cfg["region_jitter"]
                           * _gaussian_directions(rng, (n_img, cfg["regions"], latent_dim)))

    n_words = int(lens.sum())
    owner = np.repeat(np.repeat(np.arange(n_img), cfg["captions_per_image"]), lens)
    signal = objects[owner, rng.integers(0, n_obj, size=n_words)]
    words = _l2norm_rows(signal + cfg["noise"] * _gaussian_directions(rng, (n_words, latent_dim)))
    is_function = rng.random(n_words) < cfg["function_word_rate"]
    function_ids = rng.integers(0, len(function_words), size=n_words)
    words = np.where(is_function[:, None], function_words[function_ids], words)
    img = _lift(rng, regions, lift, cfg["isotropic"])
    return img, _lift(rng, words, lift, cfg["isotropic"])


def synthetic(n_images: int = 1000, regions: int = 36, dim: int = 1024,
              captions_per_image: int = 5, min_len: int = 6, max_len: int = 30,
              seed: int = 0, noise: float = 1.0, dtype: torch.dtype = torch.float32, *,
              n_concepts: int = 500, objects_per_image: int = 6, latent_dim: int = 64,
              instance_jitter: float = 0.5, region_jitter: float = 0.6,
              function_word_rate: float = 0.3, isotropic: float = 0.3) -> RetrievalSet:
    """The synthetic COCO-shaped default set (see the module docstring for the model).

    Args:
        n_images: number of images N; there are ``captions_per_image * N`` captions.
        regions, dim: R regions per image and embedding size d.
        min_len, max_len: caption length range (lengths are right-skewed, mean about
            ``min_len + 6``); ``cap`` is padded to the longest caption drawn.
        seed: the seed; the same arguments give the same set on every machine.
        noise: norm of the Gaussian noise added to each (unit) content-word signal;
            larger is harder. The default puts SCAN t2i R@1 at N=1000 in the middle of
            the 0-100 range.
        dtype: output floating dtype (float16 halves the memory of big shapes).
        n_concepts, objects_per_image, latent_dim, instance_jitter, region_jitter,
        function_word_rate, isotropic: the generative model (module docstring).
    Returns:
        RetrievalSet(img (N, R, d), cap (5N, Lmax, d) zero-padded, lens (5N,) int64), on CPU.
    """
    cfg = dict(regions=regions, captions_per_image=captions_per_image, noise=noise,
               objects_per_image=objects_per_image, instance_jitter=instance_jitter,
               region_jitter=region_jitter, function_word_rate=function_word_rate,
               isotropic=isotropic)
    _check_synthetic_args(n_images=n_images, dim=dim, min_len=min_len, max_len=max_len,
                          dtype=dtype, n_concepts=n_concepts, latent_dim=latent_dim, **cfg)
    n_blocks = (n_images + SYNTHETIC_BLOCK_IMAGES - 1) // SYNTHETIC_BLOCK_IMAGES
    blocks = [(b, min(SYNTHETIC_BLOCK_IMAGES, n_images - b * SYNTHETIC_BLOCK_IMAGES))
              for b in range(n_blocks)]
    lens_per_block = [_caption_lengths(seed, b, n * captions_per_image, min_len, max_len)
                      for b, n in blocks]
    lens = np.concatenate(lens_per_block)
    lmax = int(lens.max())

    img = torch.empty((n_images, regions, dim), dtype=dtype)
    cap = torch.zeros((len(lens), lmax, dim), dtype=dtype)
    pool = _shared_pool(seed, n_concepts, min(latent_dim, dim), dim)
    for (b, n), block_lens in zip(blocks, lens_per_block):
        i0 = b * SYNTHETIC_BLOCK_IMAGES
        c0, c1 = i0 * captions_per_image, (i0 + n) * captions_per_image
        block_img, words = _synthetic_block(seed, b, n, block_lens, pool, cfg)
        img[i0:i0 + n] = torch.from_numpy(block_img).to(dtype)
        block_cap = np.zeros((c1 - c0, lmax, dim))
        block_cap[np.arange(lmax)[None, :] < block_lens[:, None]] = words
        cap[c0:c1] = torch.from_numpy(block_cap).to(dtype)
    return RetrievalSet(img, cap, torch.from_numpy(lens))


def _check_synthetic_args(*, n_images, regions, dim, captions_per_image, min_len, max_len,
                          dtype, n_concepts, objects_per_image, latent_dim, **floats):
    for name, value in (("n_images", n_images), ("regions", regions), ("dim", dim),
                        ("captions_per_image", captions_per_image), ("min_len", min_len),
                        ("n_concepts", n_concepts), ("objects_per_image", objects_per_image),
                        ("latent_dim", latent_dim)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len < min_len:
        raise ValueError(f"max_len must be an integer >= min_len ({min_len}), got {max_len!r}")
    if objects_per_image > n_concepts:
        raise ValueError(f"objects_per_image ({objects_per_image}) must be <= n_concepts "
                         f"({n_concepts})")
    for name, value in floats.items():
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not floats["function_word_rate"] < 1.0:
        raise ValueError(f"function_word_rate must be in [0, 1), got "
                         f"{floats['function_word_rate']!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
