"""Data for retrieval evaluation: the synthetic default set, the SCAN/RCAR precomputed
format, and already-encoded embeddings.

Everything returns / works with the project conventions: images ``(n_img, R, d)``,
captions ``(n_cap, Lmax, d)`` padded, ``lens (n_cap,) int64``, caption ``5i .. 5i+4``
belonging to image ``i``.

Synthetic set (:func:`synthetic`)
---------------------------------
A COCO-shaped stand-in for encoder outputs, so that all-pairs similarity and recall can be
measured without downloading features. The generative story:

Everything is first built in a ``latent_dim``-dimensional space (64 by default: real
encoder outputs have a low effective dimension), then lifted to d:

* a shared pool of "concept" vectors (objects / attributes), drawn with Zipf-like
  frequencies, so that different images share concepts (as COCO images share "man",
  "table", ...);
* each image holds ``objects_per_image`` objects: a concept plus an instance-specific part
  (``instance_jitter``); each of its R regions shows one of its objects, plus
  region-specific jitter (overlapping boxes of the same object);
* each caption word is either a content word: one of the image's objects plus Gaussian
  noise of norm ``noise`` (relative to the unit signal), or, with probability
  ``function_word_rate``, a function word from a small shared set ("a", "the", "on", ...)
  that carries no information;
* the lift to d copies each latent coordinate into d / latent_dim output coordinates with
  random signs (a linear map with orthogonal rows, done by indexing), then adds a
  full-rank isotropic part (``isotropic``);
* every vector is l2-normalised, like the encoders' outputs.

Calibration (SCAN t2i, published settings, d=1024, default arguments): 1000 images /
5000 captions give i2t R@1 77.6, R@10 98.7 and t2i R@1 46.7, R@10 71.9 -- well above
chance (0.1%), far from perfect, so rankings are meaningful; ``noise`` moves both (noise
2.5 gives t2i R@1 about 65%). Fewer images are easier (50 images: t2i R@1 about 78%),
5000 harder.

Determinism: the random draws come from NumPy's PCG64 generator seeded per fixed-size
block of images with ``SeedSequence([seed, block, stream])``. PCG64 and its normal sampler
give the same stream on every platform; the arithmetic (elementwise float64, no BLAS, no
thread-dependent reduction; sqrt is correctly rounded) is rounded once to the requested
dtype, so the output is the same on every machine and thread count. (The one libm call,
in the gamma draw of caption lengths, could only matter if a different libm moved a draw
across a rounding boundary.) Because blocks are
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
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from rcar_fast.atomic import atomic_path

__all__ = [
    "RetrievalSet",
    "synthetic",
    "SYNTHETIC_BLOCK_IMAGES",
    "SYNTHETIC_SIZES",
    "synthetic_size",
    "Vocabulary",
    "load_vocab",
    "tokenize",
    "Tokenizer",
    "TokenizerError",
    "punkt_resource",
    "PrecompSplit",
    "load_precomp",
    "load_embeddings",
    "save_embeddings",
    "load_npy",
    "save_npy",
    "load_tensor_file",
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
    # The lift from the latent space to d: each output coordinate copies one latent
    # coordinate (every latent coordinate owns d / latent_dim of them) with a random sign.
    # That is a linear map with orthogonal rows, applied by indexing: no matrix product, so
    # it is fast and exact (no BLAS summation order that could differ between machines).
    owner = rng.permutation(dim) % latent_dim
    signs = rng.choice(np.array([-1.0, 1.0]), size=dim)
    return concepts, function_words, weights / weights.sum(), (owner, signs)


def _gaussian_directions(rng, shape):
    """Gaussian vectors scaled to unit expected norm (variance 1/d per coordinate)."""
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def _lift(rng, latent, lift, isotropic):
    """Latent unit vectors -> unit vectors in d: the lifted latent plus a full-rank part."""
    owner, signs = lift
    full = _l2norm_rows(latent[..., owner] * signs)
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
              seed: int = 0, noise: float = 3.0, dtype: torch.dtype = torch.float32, *,
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
            larger is harder. The default gives SCAN t2i R@1 about 47% (i2t about 78%) at
            N=1000, d=1024.
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


# ---------------------------------------------------------------------------------------------
# Vocabulary and tokenisation (SCAN / RCAR precomp format)
# ---------------------------------------------------------------------------------------------

class TokenizerError(RuntimeError):
    """Captions cannot be tokenised exactly as the public code does; the message says how to fix it."""


def _nltk():
    try:
        import nltk
        import nltk.tokenize  # noqa: F401  (the submodule the public code calls)
    except ImportError:
        raise TokenizerError(
            "nltk is not installed; the public SCAN/RCAR code tokenises captions with "
            "nltk.tokenize.word_tokenize, and rcar-fast uses it too so that word ids match: "
            "pip install nltk") from None
    return nltk


def punkt_resource(nltk_module=None) -> str:
    """The punkt data the installed nltk loads: 'punkt_tab' (nltk >= 3.8.2) or 'punkt'."""
    nltk_module = nltk_module or _nltk()
    return "punkt_tab" if hasattr(nltk_module.tokenize, "PunktTokenizer") else "punkt"


def _punkt_installed(nltk_module) -> bool:
    try:
        nltk_module.tokenize.sent_tokenize("a.")
    except LookupError:
        return False
    return True


# Closing characters that every nltk version's punkt realigns into the preceding sentence.
_ONLY_CLOSERS = re.compile(r"[\"')\]}]+")


class Tokenizer:
    """Caption -> tokens exactly as the public SCAN/RCAR loaders compute them:
    ``nltk.tokenize.word_tokenize(caption.lower())``.

    ``word_tokenize`` first splits the text into sentences with punkt (data that
    ``python -m nltk.downloader punkt_tab`` installs), then tokenises each sentence. Where
    the punkt data is installed it is called as is (mode "punkt"). Where it is not, the
    tokens are still exact for every caption in which punkt has no candidate sentence
    boundary (no '.', '?' or '!' followed by more text): punkt then returns the whole
    caption as one sentence (its trailing whitespace removed), so
    ``word_tokenize(text.rstrip(), preserve_line=True)`` is the same call (mode
    "preserve_line"); a candidate followed only by closing quotes or brackets
    (``stop."``) is harmless too, as punkt realigns those into the sentence. A caption that may hold two sentences is refused with the command
    that installs the data, unless ``allow_unsplit`` is set: then it is tokenised as one
    sentence (which can differ from the public tokens, e.g. "two." vs "two" "."), a
    warning is printed once and every such caption is counted in ``describe()``.

    ``lowercase="ascii"`` lower-cases ASCII letters only, as SCAN's Python 2 loader does
    (``str(caption).lower().decode('utf-8')`` on bytes); the default "unicode" is RCAR's
    ``caption.lower()``.

    Raises TokenizerError (a RuntimeError) when nltk is missing ("pip install nltk")."""

    def __init__(self, allow_unsplit: bool = False, lowercase: str = "unicode"):
        if lowercase not in ("unicode", "ascii"):
            raise ValueError(f"lowercase must be 'unicode' or 'ascii', got {lowercase!r}")
        self.nltk = _nltk()
        self.allow_unsplit, self.lowercase = allow_unsplit, lowercase
        self.has_punkt = _punkt_installed(self.nltk)
        self.unsplit = []       # captions tokenised as one sentence although they may hold more
        if not self.has_punkt:
            from nltk.tokenize.punkt import PunktLanguageVars

            # The candidate sentence ends of punkt itself (the trained model only decides
            # which candidates are real ends), so "no candidate" means "one sentence".
            self._candidate_end = PunktLanguageVars().period_context_re()

    @property
    def mode(self) -> str:
        return "punkt" if self.has_punkt else "preserve_line"

    def may_split(self, text: str) -> bool:
        """Whether punkt could split ``text`` into more than one sentence: a candidate
        sentence end followed by more than closing quotes/brackets. (After a candidate
        followed only by ``"')]}`` punkt's boundary realignment puts the closers back into
        the sentence, so it stays one sentence whatever punkt decides there.)"""
        text = text.rstrip()
        return any(not _ONLY_CLOSERS.fullmatch(text, match.end())
                   for match in self._candidate_end.finditer(text))

    def __call__(self, caption: str) -> list:
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a str, got {type(caption).__name__}")
        text = (caption.lower() if self.lowercase == "unicode"
                else caption.encode("utf-8").lower().decode("utf-8"))
        word_tokenize = self.nltk.tokenize.word_tokenize
        if self.has_punkt:
            return word_tokenize(text)
        if self.may_split(text):
            if not self.allow_unsplit:
                raise TokenizerError(
                    f"the caption {caption!r} may hold more than one sentence, and nltk's punkt "
                    f"data (which the public word_tokenize uses to split sentences) is not "
                    f"installed, so its tokens cannot be reproduced exactly; install the data "
                    f"with: python -m nltk.downloader {punkt_resource(self.nltk)} "
                    f"(or pass --allow-unsplit-sentences to tokenise such captions as one "
                    f"sentence, recorded in the results)")
            if not self.unsplit:
                warnings.warn(
                    f"nltk's punkt data is missing: captions that may hold more than one "
                    f"sentence (first: {caption!r}) are tokenised as one sentence, which can "
                    f"differ from the public tokens; the count goes into the results. Install "
                    f"the data with: python -m nltk.downloader {punkt_resource(self.nltk)}",
                    RuntimeWarning, stacklevel=2)
            self.unsplit.append(caption)
        return word_tokenize(text.rstrip(), preserve_line=True)

    def describe(self) -> dict:
        """What tokenised the captions, for the results json."""
        out = {"name": "nltk.tokenize.word_tokenize", "nltk_version": self.nltk.__version__,
               "mode": self.mode, "lowercase": self.lowercase}
        if not self.has_punkt:
            out["punkt_data"] = f"missing ({punkt_resource(self.nltk)})"
            out["unsplit_captions"] = len(self.unsplit)
            out["unsplit_examples"] = self.unsplit[:5]
        return out


_DEFAULT_TOKENIZER = []


def tokenize(caption: str) -> list:
    """Lower-cased tokens of one caption, as the public code computes them (see Tokenizer;
    a caption that may hold two sentences needs nltk's punkt data)."""
    if not _DEFAULT_TOKENIZER:
        _DEFAULT_TOKENIZER.append(Tokenizer())
    return _DEFAULT_TOKENIZER[0](caption)


class Vocabulary:
    """word -> index, with unknown words mapped to ``<unk>`` (as the public ``Vocabulary``)."""

    def __init__(self, word2idx: dict, idx2word: Optional[dict] = None, source: str = "vocabulary"):
        if "<unk>" not in word2idx:
            raise ValueError(f"{source} has no '<unk>' entry, so unknown words cannot be mapped")
        self.word2idx = {str(w): _word_id(i, w, source) for w, i in word2idx.items()}
        self.idx2word = ({_word_id(i, w, source): w for i, w in idx2word.items()}
                         if idx2word is not None
                         else {i: w for w, i in self.word2idx.items()})

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx["<unk>"])

    def __len__(self) -> int:
        return len(self.word2idx)

    def encode(self, caption: str, tokenizer: Optional[Tokenizer] = None) -> list:
        """Word ids of ``<start> tokens <end>``, as the public data loader builds them."""
        return self.encode_tokens((tokenizer or tokenize)(caption))

    def encode_tokens(self, tokens: Sequence) -> list:
        """Word ids of ``<start> tokens <end>`` for already tokenised words."""
        return [self("<start>")] + [self(token) for token in tokens] + [self("<end>")]


def _word_id(value, word, source) -> int:
    """A vocabulary id: a non-negative integer (json may give it as a digit string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{source}: the id of {word!r} must be a non-negative integer, got {value!r}")
    return int(value)


def load_vocab(path) -> Vocabulary:
    """A vocabulary json ``{"word2idx": {...}, "idx2word": {...}, ...}`` (public format)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"vocabulary file {path} is not valid json: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("word2idx"), dict):
        raise ValueError(f"vocabulary file {path} must hold a json object with a 'word2idx' "
                         f"mapping (and 'idx2word'), as the public SCAN/RCAR vocab files do")
    return Vocabulary(content["word2idx"], content.get("idx2word"), source=f"vocabulary file {path}")


# ---------------------------------------------------------------------------------------------
# The precomputed format: {split}_ims.npy (N, 36, 2048), {split}_caps.txt (5N lines)
# ---------------------------------------------------------------------------------------------

# The public loaders (SCAN data.py, RCAR image_caption.py) cut the dev split to this many captions.
PUBLIC_DEV_CAPTIONS = 5000


class PrecompSplit(NamedTuple):
    """images: (N, R, img_dim) memory-mapped; captions: 5N strings; path: the folder;
    note: what was changed to follow the public loader (the dev split's cut), or ""."""

    images: np.ndarray
    captions: list
    path: str
    note: str = ""


def _find_split_file(data_dir: str, name: str) -> str:
    for candidate in (os.path.join(data_dir, name), os.path.join(data_dir, "precomp", name)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{name} not found in {data_dir} or {os.path.join(data_dir, 'precomp')}")


def load_precomp(data_dir, split: str, captions_per_image: int = 5) -> PrecompSplit:
    """A split of the SCAN/RCAR precomputed data: ``{split}_ims.npy`` (BUTD region features,
    memory-mapped) and ``{split}_caps.txt`` (one caption per line, ``captions_per_image``
    per image, in image order), in ``data_dir`` or ``data_dir/precomp``.

    Files whose image rows are repeated once per caption (as many rows as captions) are
    read as every ``captions_per_image``-th row, as the public evaluation does. The ``dev``
    split is cut to its first 5000 captions (1000 images), as the public loaders do."""
    data_dir = os.fspath(data_dir)
    ims_path = _find_split_file(data_dir, f"{split}_ims.npy")
    caps_path = _find_split_file(data_dir, f"{split}_caps.txt")
    images = load_npy(ims_path, mmap=True)
    if images.ndim != 3 or 0 in images.shape:
        raise ValueError(f"{ims_path} must hold region features of shape (n_images, regions, "
                         f"img_dim), got shape {images.shape}")
    with open(caps_path, encoding="utf-8") as f:
        captions = [line.strip() for line in f]
    while captions and captions[-1] == "":
        captions.pop()  # a trailing newline is not a caption
    if len(images) == len(captions) and len(images) % captions_per_image == 0:
        images = images[::captions_per_image]
    if len(captions) != captions_per_image * len(images):
        raise ValueError(f"{caps_path} has {len(captions)} captions but {ims_path} has "
                         f"{len(images)} images; expected {captions_per_image} captions per image "
                         f"({captions_per_image * len(images)} lines)")
    note = ""
    if split == "dev" and len(captions) > PUBLIC_DEV_CAPTIONS:
        # The public loaders evaluate only the first 5000 dev captions ("the development set
        # for coco is large"), i.e. the first 1000 images.
        note = (f"dev split: the first {PUBLIC_DEV_CAPTIONS} of {len(captions)} captions, as "
                f"the public loaders evaluate it")
        captions = captions[:PUBLIC_DEV_CAPTIONS]
        images = images[:PUBLIC_DEV_CAPTIONS // captions_per_image]
    return PrecompSplit(images, captions, data_dir, note)


def pad_captions(captions: Sequence, dtype=None):
    """List of (L_j, d) tensors -> (cap (n, max L, d) zero-padded, lens (n,) int64)."""
    if len(captions) == 0:
        raise ValueError("pad_captions needs at least one caption")
    lens = torch.tensor([len(c) for c in captions], dtype=torch.int64)
    if int(lens.min()) < 1:
        raise ValueError("every caption needs at least one word")
    first = torch.as_tensor(captions[0])
    cap = torch.zeros((len(captions), int(lens.max()), first.shape[-1]),
                      dtype=dtype or first.dtype)
    for j, words in enumerate(captions):
        cap[j, :len(words)] = torch.as_tensor(words)
    return cap, lens


# ---------------------------------------------------------------------------------------------
# Pre-encoded embeddings: img_embs, cap_embs, cap_lens (.npy or .pt)
# ---------------------------------------------------------------------------------------------

EMBEDDING_FILES = ("img_embs", "cap_embs", "cap_lens")


def load_npy(path, mmap: bool = True, allow_pickle: bool = False):
    """np.load of one .npy file (memory-mapped when ``mmap``); a truncated or malformed
    file raises ValueError naming it."""
    path = os.fspath(path)
    try:
        return np.load(path, mmap_mode="r" if mmap and not allow_pickle else None,
                       allow_pickle=allow_pickle)
    except (ValueError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable .npy file (truncated or not written by "
                         f"numpy.save?): {err}") from None


def load_tensor_file(path):
    """One tensor from a .pt file, loaded weights-only (a file that needs arbitrary pickled
    objects, a truncated or a malformed file raise ValueError naming it)."""
    path = os.fspath(path)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- pickle, zip and EOF errors of several kinds
        raise ValueError(f"{path} cannot be read as a weights-only torch file "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         f"it must hold one tensor saved with torch.save") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} must hold one tensor, got {type(value).__name__}")
    return value


def _load_array(directory: str, stem: str, mmap: bool):
    for ext in (".npy", ".pt"):
        path = os.path.join(directory, stem + ext)
        if os.path.isfile(path):
            if ext == ".npy":
                return load_npy(path, mmap), path
            return load_tensor_file(path), path
    raise FileNotFoundError(f"{stem}.npy or {stem}.pt not found in {directory}")


def _is_integer_dtype(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return np.issubdtype(x.dtype, np.integer)


def load_embeddings(directory, captions_per_image: int = 5, mmap: bool = True) -> RetrievalSet:
    """Already-encoded embeddings: ``img_embs`` (N, R, d), ``cap_embs`` (5N, Lmax, d) and
    ``cap_lens`` (5N,) as .npy (memory-mapped when ``mmap``) or .pt files.

    img/cap come back as np.memmap arrays (for .npy with mmap) or tensors; evaluation reads
    them block by block. An ``img_embs`` with one row per caption (the public
    ``encode_data`` output) is read as every ``captions_per_image``-th row."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"embeddings directory not found: {directory}")
    (img, img_path), (cap, cap_path), (lens, lens_path) = (
        _load_array(directory, stem, mmap) for stem in EMBEDDING_FILES)
    for x, path, doc in ((img, img_path, "(n_img, R, d)"), (cap, cap_path, "(n_cap, Lmax, d)")):
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"{path} must have shape {doc}, got {tuple(x.shape)}")
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"{img_path} has d={img.shape[2]} but {cap_path} has d={cap.shape[2]}")
    if lens.ndim != 1 or not _is_integer_dtype(lens):
        raise ValueError(f"{lens_path} must hold integer lengths (an integer dtype) of shape "
                         f"(n_cap,), got dtype {lens.dtype} and shape {tuple(lens.shape)}")
    if not isinstance(lens, torch.Tensor):
        lens = torch.from_numpy(np.array(lens, dtype=np.int64))
    lens = lens.to(torch.int64)
    if len(lens) != cap.shape[0]:
        raise ValueError(f"{lens_path} has {len(lens)} lengths but {cap_path} has "
                         f"{cap.shape[0]} captions")
    if int(lens.min()) < 1 or int(lens.max()) > cap.shape[1]:
        raise ValueError(f"{lens_path} lengths must lie in [1, {cap.shape[1]}] (the caption "
                         f"padding size), got [{int(lens.min())}, {int(lens.max())}]")
    if img.shape[0] == cap.shape[0] and img.shape[0] % captions_per_image == 0:
        img = img[::captions_per_image]
    if cap.shape[0] != captions_per_image * img.shape[0]:
        raise ValueError(f"{cap_path} has {cap.shape[0]} captions but {img_path} has "
                         f"{img.shape[0]} images; expected {captions_per_image} per image")
    return RetrievalSet(img, cap, lens)


def save_npy(path, array) -> None:
    """np.save to ``path`` atomically (rcar_fast.atomic: no partial file on error or signal).
    ``array`` may be an object (a dict: the public ``{'npts', 'sims'}`` results)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=isinstance(array, dict))


def save_embeddings(directory, img, cap, lens) -> None:
    """Writes img_embs.npy, cap_embs.npy, cap_lens.npy (each atomically) for load_embeddings."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for stem, value in zip(EMBEDDING_FILES, (img, cap, lens)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        save_npy(os.path.join(directory, stem + ".npy"), array)
