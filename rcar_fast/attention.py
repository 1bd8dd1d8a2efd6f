"""Attention maps of chosen (image, caption) pairs, and the ``rcar-fast attention`` command.

    attention_maps(img, cap, lens, pairs, head="scan", *, img_lens=None, direction=None,
                   step=-1, **options) -> [ (L_j, R_i) float64 tensor per pair ]

Each pair's map is word x region (rows: the caption's ``lens[j]`` real words, columns: the
image's ``img_lens[i]`` real regions), the layout the public RCAR
``visualize_attention_mechanism.py`` reads per pair (its word2region weights are (n_word,
n_region); its region2word weights are the transpose of our i2t map). What a map holds:

* ``head="scan"``: SCAN's attention softmax (SIMILARITY.md steps 1-3), with ``raw_norm`` and
  ``smooth`` as ``scan_similarity`` takes them (``agg`` / ``lse_lambda`` are accepted and
  checked, and do not change the weights). t2i: row w is word w's softmax over the regions
  (rows sum to 1); i2t: column r is region r's softmax over the words (columns sum to 1).
  A SCAN checkpoint's ``SCANHead`` (``load_checkpoint(...).sim_enc``) gives the same at its
  own direction, raw_norm and smooth.
* an RCAR head module (``RCARSimilarity`` / ``reference.RCARHead``): the same softmax at the
  head's own direction, with the per-word modulation and temperature of RCAR's LAST attention
  step (``step`` picks another: 0 .. n_steps - 1, or negative from the end; only_rar has one
  step, only_rcr n has n + 1, coop_rcar n has n). The weights are read from the reference's
  own RCAR steps (reference_math.rcar_pair_scores(observe=...)), in float64.
* the S-only heads (``head="maxsim"`` with ``max_similarity``'s keyword parameters, or a preset
  name: "chan", "laps", "aladin", "teran", "colbert", "dvsa"): the one-hot of the tile's
  argmax, the FIRST maximal index on ties (HEADS.md). t2i: row w is 1 at
  argmax_r S[r, w]; i2t: column r is 1 at argmax_w S[r, w]. ``normalize="unit"`` changes which
  region wins; leaky and the pooling do not (leaky is increasing), so they are only checked.
  ``coding="vsa"`` (CHAN's VSA, i2t): column r is softmax_w(S[r, .] / vsa_tau) instead.

``direction`` chooses the map: "t2i" or "i2t"; None means the head's own (SCAN: "t2i"). A head
that scores both directions ("laps") needs it named. A module's (RCAR head, SCANHead) and a
one-direction preset's map is their own direction only; for "maxsim" without a preset it is
the head's direction (default "t2i"; coding="vsa" needs "i2t", as in max_similarity).

Computed pair by pair on the real block (sliced, so padding, NaN or not, is never read), in
float64 whatever the inputs' dtype (an RCAR head is copied to float64 for the call), without
autograd; the maps come back float64 on img's device. ``img_lens`` (n_img,) limits image i to
its first ``img_lens[i]`` regions (for scan / RCAR: the map of ``img[i, :img_lens[i]]``).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from rcar_fast import reference_math, validate
from rcar_fast.atomic import atomic_path
from rcar_fast.contract import DIRECTIONS, HEAD_PRESETS
from rcar_fast.encoders import SCANHead
from rcar_fast.heads import RCARHead
from rcar_fast.ops import maxsim as maxsim_op
from rcar_fast.ops.scan import ScanScorer
from rcar_fast.reference_heads import unit_normalize

__all__ = ["attention_maps", "attention_steps", "pair_list", "overlay", "render_pair",
           "save_figure", "HEAD_NAMES"]

# The S-only heads by name: "maxsim" takes max_similarity's parameters, a preset fills them.
MAXSIM_HEAD = "maxsim"
HEAD_NAMES = ("scan", MAXSIM_HEAD) + tuple(HEAD_PRESETS)
# max_similarity's keyword parameters and their defaults.
MAXSIM_DEFAULTS = maxsim_op.DEFAULTS


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def pair_list(pairs, n_img: int, n_cap: int) -> List[tuple]:
    """[(i, j), ...] from a sequence of (image, caption) index pairs or a (P, 2) integer
    array / tensor, each index in range."""
    expected = ("pairs must be a sequence of (image index, caption index) pairs or a (P, 2) "
                "integer array")
    if isinstance(pairs, (torch.Tensor, np.ndarray)):
        array = pairs.detach().cpu().numpy() if isinstance(pairs, torch.Tensor) else pairs
        if array.dtype.kind not in "iu" or array.ndim != 2 or array.shape[1] != 2:
            raise TypeError(f"{expected}, got an array of shape {tuple(array.shape)} and "
                            f"dtype {array.dtype}")
        found = [tuple(int(v) for v in row) for row in array.tolist()]
    else:
        if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
            raise TypeError(f"{expected}, got {type(pairs).__name__}")
        found = []
        for item in pairs:
            if (isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2
                    or not all(validate._is_integer_scalar(v) for v in item)):
                hint = (" (one pair (i, j) goes in a list: [(i, j)])"
                        if validate._is_integer_scalar(item) else "")
                raise TypeError(f"{expected}; an entry is {item!r}{hint}")
            found.append((int(item[0]), int(item[1])))
    for i, j in found:
        if not (0 <= i < n_img and 0 <= j < n_cap):
            raise ValueError(f"pairs: ({i}, {j}) is out of range: image indices lie in "
                             f"[0, n_img={n_img}), caption indices in [0, n_cap={n_cap})")
    return found


class _Head(NamedTuple):
    """A resolved head: the directions it maps, its default one (None: it scores both, the
    caller must choose) and make(direction) -> the pair function."""
    allowed: tuple
    default: Optional[str]
    make: Callable
    what: str


def _choose_direction(direction, head: _Head) -> str:
    """The map's direction: the given one, which must be one the head scores, or its default."""
    if direction is None:
        if head.default is None:
            raise ValueError(f"direction: {head.what} scores both directions; pass "
                             f"direction='t2i' or direction='i2t' to choose the map")
        return head.default
    validate.choice(direction, "direction", DIRECTIONS)
    if direction not in head.allowed:
        raise ValueError(f"direction={direction!r} is not a direction of {head.what} (it "
                         f"scores {' and '.join(head.allowed)})")
    return direction


def _maxsim_settings(head: str, options: dict, direction) -> dict:
    """max_similarity's settings of an S-only head (validate.head_settings: the preset filled
    in, a contradicting argument an error naming both). Without a preset the head's direction
    is the map's."""
    accepted = (set(MAXSIM_DEFAULTS) - {"direction"}) | {"preset"}
    unknown = set(options) - accepted
    if unknown:
        raise TypeError(f"unexpected keyword(s) {sorted(unknown)} for head {head!r}; expected "
                        f"some of {sorted(accepted)} (the map's direction is direction=)")
    preset = options.pop("preset", None)
    if head != MAXSIM_HEAD:
        if preset not in (None, head):
            raise ValueError(f"preset={preset!r} contradicts head={head!r} (a preset name)")
        preset = head
    given = {k: v for k, v in options.items() if v is not None}
    if preset is None and direction is not None:
        given["direction"] = direction
    return validate.head_settings(preset, given, MAXSIM_DEFAULTS)


# ---------------------------------------------------------------------------------------------
# One pair's map, per kind of head: fn(regions (R_i, d), words (L, d)) -> (L, R_i), float64
# ---------------------------------------------------------------------------------------------

def _orient(direction: str, regions, words):
    """(query, context): t2i queries words, i2t queries regions (SIMILARITY.md)."""
    return (words, regions) if direction == "t2i" else (regions, words)


def _word_by_region(direction: str, alpha: torch.Tensor) -> torch.Tensor:
    """alpha (queries, contexts) as word x region."""
    return alpha if direction == "t2i" else alpha.transpose(-1, -2)


def _scan_map_fn(direction: str, raw_norm: str, smooth: float):
    def fn(regions, words):
        query, context = _orient(direction, regions, words)
        scores = reference_math.raw_scores(query, context)
        return _word_by_region(direction, reference_math.attention_weights(scores, smooth, raw_norm))
    return fn


def attention_steps(head: RCARHead) -> int:
    """Number of cross attentions one RCAR pair score runs (the steps ``step`` indexes)."""
    if head.regulator == "only_rar":
        return 1
    if head.regulator == "only_rcr":
        return head.steps + 1
    return head.steps


def _rcar_map_fn(head: RCARHead, step: int):
    # A float64 copy in eval mode: the caller's head keeps its dtype, mode and RNG stream (RAR's
    # dropout, which would draw numbers in training mode, does not touch the attention).
    head64 = copy.deepcopy(head).to(torch.float64).eval()

    def fn(regions, words):
        query, context = _orient(head.direction, regions.unsqueeze(0), words.unsqueeze(0))
        seen = []
        reference_math.rcar_pair_scores(head64, query, context, observe=seen.append)
        return _word_by_region(head.direction, seen[step][0])
    return fn


def _maxsim_map_fn(direction: str, settings: dict):
    def fn(regions, words):
        if settings["normalize"] == "unit":
            regions, words = unit_normalize(regions), unit_normalize(words)
        tile = regions @ words.T                                     # S (R_i, L)
        if settings["coding"] == "vsa":                              # a_r = softmax_w(S / tau)
            return torch.softmax(tile / settings["vsa_tau"], dim=1).T
        maxed_axis = 0 if direction == "t2i" else 1                  # t2i: over regions
        # torch.max(dim) returns the FIRST maximal index (HEADS.md ties).
        winner = tile.max(dim=maxed_axis, keepdim=True).indices
        one_hot = torch.zeros_like(tile).scatter_(maxed_axis, winner, 1.0)
        return one_hot.T
    return fn


def _check_step(head: RCARHead, step) -> int:
    n_steps = attention_steps(head)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
            or not -n_steps <= step < n_steps:
        raise ValueError(f"step must be an integer in [{-n_steps}, {n_steps}) for this "
                         f"{head.regulator} head with {n_steps} attention step(s), got {step!r}")
    return int(step)


def _scan_head(options: dict, dtype: torch.dtype) -> _Head:
    if "direction" in options:
        raise TypeError("the map's direction is attention_maps' direction=, not a SCAN option")
    unknown = set(options) - set(ScanScorer.defaults)
    if unknown:
        raise TypeError(f"unexpected SCAN keyword(s) {sorted(unknown)}; expected some of "
                        f"{sorted(k for k in ScanScorer.defaults if k != 'direction')}")
    kw = {**ScanScorer.defaults, **options}
    validate.choice(kw["raw_norm"], "raw_norm", reference_math.RAW_NORMS)
    validate.choice(kw["agg"], "agg", reference_math.AGGREGATIONS)
    validate.lse_lambda_value(kw["lse_lambda"])
    smooth = validate.smooth_for(kw["smooth"], dtype)
    return _Head(DIRECTIONS, ScanScorer.defaults["direction"],
                 lambda direction: _scan_map_fn(direction, kw["raw_norm"], smooth), "SCAN")


def _resolve_head(head, step, options: dict, dtype: torch.dtype = torch.float64,
                  direction=None) -> _Head:
    if isinstance(head, RCARHead):
        if options:
            raise TypeError(f"keywords {sorted(options)} do not apply to an RCAR head (its "
                            "settings are the module's attributes)")
        step = _check_step(head, step)
        return _Head((head.direction,), head.direction, lambda _: _rcar_map_fn(head, step),
                     f"this RCAR head (direction {head.direction!r})")
    if step != -1:
        raise TypeError("step applies to an RCAR head only (the other heads have one attention)")
    if isinstance(head, SCANHead):          # a SCAN checkpoint's sim_enc: its own settings
        if options:
            raise TypeError(f"keywords {sorted(options)} do not apply to a SCANHead (its "
                            "settings are the module's attributes)")
        settings = {k: v for k, v in head.options().items() if k != "direction"}
        resolved = _scan_head(settings, dtype)
        return resolved._replace(allowed=(head.direction,), default=head.direction,
                                 what=f"this SCANHead (direction {head.direction!r})")
    if isinstance(head, str) and head == "scan":
        return _scan_head(options, dtype)
    if isinstance(head, str) and head in HEAD_NAMES:
        settings = _maxsim_settings(head, dict(options), direction)
        own = settings["direction"]
        allowed = DIRECTIONS if own == "both" else (own,)
        return _Head(allowed, None if own == "both" else own,
                     lambda chosen: _maxsim_map_fn(chosen, settings), f"head {head!r}")
    raise ValueError(f"head must be one of {HEAD_NAMES}, an RCAR head module "
                     f"(rcar_fast.RCARSimilarity / reference.RCARHead) or a SCAN checkpoint's "
                     f"SCANHead, got {type(head).__name__} {head!r}")


def head_directions(head="scan", step: int = -1, **options) -> tuple:
    """The map direction(s) of the head's own scoring: (its direction,), or ("t2i", "i2t")
    for a head that scores both (where attention_maps needs direction= named)."""
    direction = options.pop("direction", None)
    resolved = _resolve_head(head, step, options, direction=direction)
    return resolved.allowed if resolved.default is None else (resolved.default,)


# ---------------------------------------------------------------------------------------------
# Public: the maps
# ---------------------------------------------------------------------------------------------

def attention_maps(img, cap, lens, pairs, head="scan", *, img_lens=None, direction=None,
                   step: int = -1, **options) -> List[torch.Tensor]:
    """Word x region weights of each listed pair (see the module docstring).

    img (n_img, R, d), cap (n_cap, Lmax, d) with positions >= lens[j] ignored, lens (n_cap,);
    pairs: [(i, j), ...] or a (P, 2) integer array. head: "scan" (options: raw_norm, smooth,
    agg, lse_lambda), an RCAR head module, "maxsim" (options: max_similarity's preset, pool,
    tau, leaky, normalize, both_scale, coding, vsa_tau) or a preset name; direction: the
    map's, "t2i" | "i2t" (None: the head's own); step: an RCAR head's attention step. Returns one (lens[j], img_lens[i]) float64
    tensor per pair, in order, on img's device.
    """
    if lens is None:
        raise TypeError("lens must be the caption lengths (n_cap,), got None")
    lens, img_lens = validate.head_inputs(img, cap, lens, img_lens)
    regions, words = img_lens.tolist(), lens.tolist()
    chosen = pair_list(pairs, img.shape[0], cap.shape[0])
    resolved = _resolve_head(head, step, dict(options), img.dtype, direction)
    if isinstance(head, RCARHead):
        validate.head_fits(head, img)
    pair_fn = resolved.make(_choose_direction(direction, resolved))
    with torch.no_grad():
        return [pair_fn(img[i, :regions[i]].to(torch.float64), cap[j, :words[j]].to(torch.float64))
                for i, j in chosen]


# ---------------------------------------------------------------------------------------------
# Rendering (matplotlib's Agg canvas, no pyplot: nothing global changes)
# ---------------------------------------------------------------------------------------------

DEFAULT_CMAP = "jet"        # what the public visualize_attention_mechanism.py overlays with
OVERLAY_ALPHA = 0.5         # its blend weight
# Layout, in inches: room for the word labels (left), the colorbar (right), the title (top)
# and the region numbers (bottom) around a heat map of CELL_INCHES per cell.
CELL_INCHES = 0.32
MARGINS = dict(left=1.6, right=1.1, top=0.6, bottom=0.6)
MIN_WIDTH_INCHES = 6.0
OVERLAY_COLUMNS = 4
MAX_OVERLAY_INCHES = 3.0
OVERLAY_GAP_INCHES = 0.1
OVERLAY_TITLE_INCHES = 0.3


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError(f"rendering attention maps needs matplotlib ({err}); "
                           "pip install matplotlib") from None
    return matplotlib, Figure, FigureCanvasAgg


def _colormap(name: str):
    matplotlib, _, _ = _matplotlib()
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"cmap must name a matplotlib colormap, got {name!r}") from None


def as_rgb(image) -> np.ndarray:
    """An image array (H, W), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1], as float RGB
    (H, W, 3) in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape:
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype.kind in "iu":
        return image.astype(np.float64) / np.iinfo(image.dtype).max
    return np.clip(image.astype(np.float64), 0.0, 1.0)


def check_boxes(boxes, n_regions: int, what: str = "boxes") -> np.ndarray:
    """Region boxes (R, 4) as BUTD writes them, x1 y1 x2 y2 in pixels, x1 <= x2, y1 <= y2."""
    boxes = np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) \
        else boxes.detach().cpu().to(torch.float64).numpy()
    if boxes.shape != (n_regions, 4):
        raise ValueError(f"{what} must have shape (R, 4) = ({n_regions}, 4) (x1 y1 x2 y2 per "
                         f"region), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what} holds NaN or Inf")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(f"{what} must be x1 y1 x2 y2 with x1 <= x2 and y1 <= y2; region {bad} "
                         f"is {boxes[bad].tolist()}")
    return boxes


def _box_pixels(box, height: int, width: int):
    """(row slice, column slice) a box covers: its pixels, clipped to the image."""
    x1, y1, x2, y2 = box
    cols = slice(int(min(max(math.floor(x1), 0), width)), int(min(max(math.ceil(x2), 0), width)))
    rows = slice(int(min(max(math.floor(y1), 0), height)), int(min(max(math.ceil(y2), 0), height)))
    return rows, cols


def overlay(image, boxes, weights, *, vmax: Optional[float] = None, cmap: str = DEFAULT_CMAP,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """One word's region weights (R,) painted on the image: each pixel inside a box takes the
    colour of the largest weight among the boxes covering it (scaled by vmax, default the
    largest weight), blended with the image (alpha: the colour's share); pixels outside every
    box keep the image. Returns float RGB (H, W, 3) in [0, 1]."""
    rgb = as_rgb(image)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    boxes = check_boxes(boxes, weights.shape[0])
    height, width = rgb.shape[:2]
    heat = np.full((height, width), -np.inf)
    for box, weight in zip(boxes, weights):
        rows, cols = _box_pixels(box, height, width)
        heat[rows, cols] = np.maximum(heat[rows, cols], weight)
    covered = np.isfinite(heat)
    scale = float(vmax) if vmax is not None else float(weights.max(initial=0.0))
    colours = _colormap(cmap)(np.clip(heat[covered] / (scale if scale > 0 else 1.0), 0.0, 1.0))
    out = rgb.copy()
    out[covered] = (1.0 - alpha) * rgb[covered] + alpha * colours[:, :3]
    return out


def _layout(n_words: int, n_regions: int, n_overlays: int, image_shape) -> dict:
    """Figure size and the axes rectangles (x, y, w, h), in inches from the bottom left:
    the heat map on top, centred, and the overlays below, OVERLAY_COLUMNS a row."""
    m = MARGINS
    heat_w, heat_h = CELL_INCHES * n_regions, CELL_INCHES * n_words
    width = max(m["left"] + heat_w + m["right"], MIN_WIDTH_INCHES)
    columns = min(OVERLAY_COLUMNS, n_overlays)
    cells, overlay_h = [], 0.0
    if columns:
        cell_w = min(width / columns, MAX_OVERLAY_INCHES)
        img_w = cell_w - OVERLAY_GAP_INCHES
        img_h = img_w * image_shape[0] / image_shape[1]
        cell_h = img_h + OVERLAY_TITLE_INCHES
        n_rows = -(-n_overlays // columns)
        overlay_h = n_rows * cell_h + OVERLAY_GAP_INCHES
        x0 = (width - columns * cell_w) / 2 + OVERLAY_GAP_INCHES / 2
        for k in range(n_overlays):
            row, col = divmod(k, columns)
            cells.append((x0 + col * cell_w, overlay_h - (row + 1) * cell_h, img_w, img_h))
    height = m["top"] + heat_h + m["bottom"] + overlay_h
    left = m["left"] + (width - (m["left"] + heat_w + m["right"])) / 2
    heat = (left, overlay_h + m["bottom"], heat_w, heat_h)
    colorbar = (left + heat_w + 0.15, overlay_h + m["bottom"], 0.2, heat_h)
    return dict(size=(width, height), heat=heat, colorbar=colorbar, overlays=cells)


def _tick_step(n: int, most: int = 40) -> int:
    return max(1, -(-n // most))


def render_pair(weights, words: Optional[Sequence[str]] = None, *, image=None, boxes=None,
                word: Optional[int] = None, title: Optional[str] = None,
                cmap: str = DEFAULT_CMAP, dpi: int = 100):
    """A matplotlib Figure (Agg canvas) of one pair's (L, R) map: the word x region heat map
    (colours from 0 to the map's largest weight), and, when image and boxes (R, 4) are given,
    the overlay of word ``word``'s weights on the image (each word's when word is None)."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    weights = (weights.detach().cpu().to(torch.float64).numpy() if isinstance(weights, torch.Tensor)
               else np.asarray(weights, dtype=np.float64))
    if weights.ndim != 2 or 0 in weights.shape or not np.isfinite(weights).all():
        raise ValueError(f"weights must be a finite (L, R) map, got shape {weights.shape}")
    n_words, n_regions = weights.shape
    words = [str(w) for w in (words if words is not None else range(n_words))]
    if len(words) != n_words:
        raise ValueError(f"words: {len(words)} labels for a map of {n_words} words")
    if (image is None) != (boxes is None):
        raise ValueError("image and boxes go together: give both for the overlay, or neither")
    shown = []
    if image is not None:
        image, boxes = as_rgb(image), check_boxes(boxes, n_regions)
        if word is not None and not (isinstance(word, (int, np.integer)) and 0 <= word < n_words):
            raise ValueError(f"word must be a word index in [0, {n_words}), got {word!r}")
        shown = list(range(n_words)) if word is None else [int(word)]
    vmax = float(weights.max()) if weights.max() > 0 else 1.0
    colormap = _colormap(cmap)
    layout = _layout(n_words, n_regions, len(shown), None if image is None else image.shape)
    fig = Figure(figsize=layout["size"], dpi=dpi)
    FigureCanvasAgg(fig)
    width, height = layout["size"]

    def axes(rect):
        x, y, w, h = rect
        return fig.add_axes((x / width, y / height, w / width, h / height))

    heat = axes(layout["heat"])
    picture = heat.imshow(weights, cmap=colormap, vmin=0.0, vmax=vmax, interpolation="nearest",
                          aspect="auto")
    heat.set_yticks(range(n_words), words, fontsize=8)
    step = _tick_step(n_regions)
    heat.set_xticks(range(0, n_regions, step), [str(r) for r in range(0, n_regions, step)],
                    fontsize=7)
    heat.set_xlabel("region", fontsize=8)
    fig.colorbar(picture, cax=axes(layout["colorbar"]))
    if title:
        fig.suptitle(title, fontsize=10)
    for k, rect in zip(shown, layout["overlays"]):
        ax = axes(rect)
        ax.imshow(overlay(image, boxes, weights[k], vmax=vmax, cmap=cmap), interpolation="nearest")
        ax.set_title(words[k], fontsize=8)
        ax.set_axis_off()
    return fig


def save_figure(fig, path) -> str:
    """Writes the figure as a PNG at its own size and dpi, atomically (rcar_fast.atomic)."""
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path


# ---------------------------------------------------------------------------------------------
# The ``rcar-fast attention`` command (rcar_fast.cli builds its parser and calls run_command)
# ---------------------------------------------------------------------------------------------

def parse_pairs(text: str) -> List[tuple]:
    """"i:j,i:j" -> [(i, j), ...] (image index : caption index)."""
    found = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--pairs must be image:caption index pairs separated by commas "
                             f"(e.g. 0:0,0:1), got {item.strip()!r}")
        found.append((int(parts[0]), int(parts[1])))
    if len(set(found)) != len(found):
        twice = next(p for p in found if found.count(p) > 1)
        raise ValueError(f"--pairs lists {twice[0]}:{twice[1]} more than once")
    return found


def _command_head(args):
    """(head, its options, a description) from --checkpoint or --head and the option flags."""
    scan_flags = {"smooth": args.smooth, "raw_norm": args.raw_norm}
    maxsim_flags = {"normalize": args.normalize, "coding": args.coding}
    if args.checkpoint is not None:
        from rcar_fast.checkpoint import load_checkpoint

        if args.head is not None:
            raise ValueError("give --checkpoint or --head, not both")
        model = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
        unused = [f"--{k.replace('_', '-')}" for k, v in {**scan_flags, **maxsim_flags}.items()
                  if v is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} do(es) not apply to --checkpoint (the "
                             f"checkpoint's settings are used)")
        kind = "SCAN" if model.kind == "scan" else f"RCAR {model.sim_enc.regulator}"
        return model.sim_enc, {}, f"{kind} ({os.path.basename(args.checkpoint)})"
    head = args.head or "scan"
    flags = scan_flags if head == "scan" else maxsim_flags
    other = maxsim_flags if head == "scan" else scan_flags
    unused = [f"--{k.replace('_', '-')}" for k, v in other.items() if v is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)} do(es) not apply to --head {head}")
    return head, {k: v for k, v in flags.items() if v is not None}, head


def _caption_labels(path, caption_ids, lens, vocab_path) -> dict:
    """{caption index: word labels} from a captions file (one caption a line, the
    {split}_caps.txt layout; with --vocab, lines of word ids), checked against cap_lens: a
    caption encoded with <start> and <end> has 2 more words than its tokens."""
    from rcar_fast import data

    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    vocab = data.load_vocab(vocab_path) if vocab_path else None
    tokenizer = None if vocab else data.Tokenizer(allow_unsplit=True)
    labels = {}
    for j in caption_ids:
        if j >= len(lines):
            raise ValueError(f"--captions {path} has {len(lines)} lines; caption {j} is not there")
        if vocab is not None:
            ids = lines[j].split()
            if not all(t.isdigit() for t in ids):
                raise ValueError(f"--captions {path} line {j + 1}: with --vocab each line holds "
                                 f"word ids, got {lines[j]!r}")
            tokens = [vocab.idx2word.get(int(t), f"<{t}>") for t in ids]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # labels only
                tokens = ["<start>"] + tokenizer(lines[j]) + ["<end>"]
        n_words = int(lens[j])
        if len(tokens) == n_words + 2 and vocab is None:
            tokens = tokens[1:-1]          # encoded without <start> / <end>
        if len(tokens) != n_words:
            raise ValueError(f"caption {j} has {len(tokens)} words in --captions {path} but "
                             f"{n_words} in cap_lens")
        labels[j] = tokens
    return labels


def _boxes_of(pattern: str, i: int, pairs, n_img: int, n_cap: int) -> tuple:
    """(path, boxes of image i): a file per image ({img} in the path), one file for the split
    ((n_img, R, 4), or the public test_ims_bbx.npy's one row per caption (n_cap, R, 4), read
    at image i's first caption), or one (R, 4) file when the pairs use one image."""
    from rcar_fast import data

    path = pattern.replace("{img}", str(i))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--boxes {path}: file not found")
    boxes = np.asarray(data.load_npy(path, mmap=False))
    if "{img}" not in pattern and boxes.ndim == 3:
        if boxes.shape[0] not in (n_img, n_cap):
            raise ValueError(f"--boxes {path} holds {boxes.shape[0]} rows of boxes; expected "
                             f"one per image ({n_img}) or one per caption ({n_cap})")
        return path, boxes[i if boxes.shape[0] == n_img else i * (n_cap // n_img)]
    if "{img}" not in pattern and len({p[0] for p in pairs}) > 1:
        raise ValueError(f"--boxes {path} holds one image's boxes but --pairs use several "
                         f"images; give (n_img, R, 4) boxes or put {{img}} in the path")
    return path, boxes


def _pair_pictures(args, pairs, n_regions: int, n_img: int, n_cap: int) -> dict:
    """{image index: (RGB image, boxes (R, 4))} for the overlay, read and checked up front."""
    if (args.image is None) != (args.boxes is None):
        raise ValueError("--image and --boxes go together (the overlay needs both)")
    if args.image is None:
        return {}
    _matplotlib()
    from matplotlib.image import imread

    if "{img}" not in args.image and len({p[0] for p in pairs}) > 1:
        raise ValueError("--image names one file but --pairs use several images; put {img} in "
                         "the path for the image index")
    pictures = {}
    for i in sorted({p[0] for p in pairs}):
        image_path = args.image.replace("{img}", str(i))
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"--image {image_path}: file not found")
        boxes_path, boxes = _boxes_of(args.boxes, i, pairs, n_img, n_cap)
        try:
            image = imread(image_path)
        except Exception as err:  # noqa: BLE001 -- PIL / PNG errors of several kinds
            raise ValueError(f"--image {image_path} cannot be read as an image ({err})") from None
        pictures[i] = (as_rgb(image), check_boxes(boxes, n_regions, f"--boxes {boxes_path}"))
    return pictures


def _word_index(word, labels: List[str]) -> Optional[int]:
    if word is None:
        return None
    if word.isdigit():
        if int(word) >= len(labels):
            raise ValueError(f"--word {word}: the caption has {len(labels)} words")
        return int(word)
    if word not in labels:
        raise ValueError(f"--word {word!r} is not a word of the caption ({' '.join(labels)})")
    return labels.index(word)


def run_command(args) -> int:
    """rcar-fast attention: one PNG per pair and direction in --out (and the map as .npy
    with --save-weights)."""
    from rcar_fast import data

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder (created if missing)")
    if args.word is not None and args.image is None:
        raise ValueError("--word selects the word of the overlay: it needs --image and --boxes")
    pairs = parse_pairs(args.pairs)
    img_all, cap_all, lens_all = data.load_embeddings(args.embeddings)
    pair_list(pairs, img_all.shape[0], cap_all.shape[0])           # range check, named
    head, options, description = _command_head(args)
    # A head scoring both directions (laps) gets both maps unless --direction picks one.
    directions = [args.direction] if args.direction else list(head_directions(head, **options))
    labels = (_caption_labels(args.captions, sorted({j for _, j in pairs}), lens_all, args.vocab)
              if args.captions else {})
    pictures = _pair_pictures(args, pairs, img_all.shape[1], img_all.shape[0], cap_all.shape[0])

    # Only the images and captions the pairs use leave the (memory-mapped) files.
    images, captions = sorted({i for i, _ in pairs}), sorted({j for _, j in pairs})
    img = torch.as_tensor(np.stack([np.asarray(img_all[i]) for i in images]))
    cap = torch.as_tensor(np.stack([np.asarray(cap_all[j]) for j in captions]))
    lens = lens_all[captions]
    local = [(images.index(i), captions.index(j)) for i, j in pairs]
    # Everything is computed and checked before the first file is written.
    maps = {direction: attention_maps(img, cap, lens, local, head, direction=direction, **options)
            for direction in directions}
    words = {j: labels.get(j, [str(w) for w in range(int(lens_all[j]))]) for j in captions}
    chosen_word = {j: _word_index(args.word, words[j]) for j in captions} if pictures else {}
    os.makedirs(args.out, exist_ok=True)
    written = []
    for direction, direction_maps in maps.items():
        for (i, j), weights in zip(pairs, direction_maps):
            image, boxes = pictures.get(i, (None, None))
            stem = os.path.join(args.out, f"img{i}_cap{j}_{direction}")
            fig = render_pair(weights, words[j], image=image, boxes=boxes,
                              word=chosen_word.get(j), cmap=args.cmap, dpi=args.dpi,
                              title=f"{description} {direction}: image {i}, caption {j}")
            written.append(save_figure(fig, stem + ".png"))
            if args.save_weights:
                data.save_npy(stem + ".npy", weights.cpu().numpy())
    for path in written:
        print(path)
    return 0
