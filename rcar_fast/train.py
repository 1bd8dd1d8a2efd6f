"""Example trainer: any head of the registry (rcar_fast.scorers: SCAN, an RCAR head, ...) on
the synthetic set with the hardest-negative loss.

    python -m rcar_fast.train --head scan --backend auto --steps 200
    python -m rcar_fast.train --head rcar --backend reference --steps 50 --loss full

--head (also spelled --model) is any name of rcar_fast.scorers.names(); the head's scorer
builds it for the joint embedding size (Scorer.build) from the generic options below
(--direction, --smooth; --sim-dim, --regulator, --rcar-steps, --head-dropout for heads with
weights), each head taking those that apply to it, None meaning the head's published default.

What is trained: two projections, one for region features and one for word features
(Linear + l2norm, stand-ins for the image and text encoders: the synthetic set already
holds encoder-output-like vectors, not pixels or token ids), and the head's own weights when
it has any (--head rcar). The word projection starts as a copy of the region projection (one
shared random embedding; --untied-init starts them apart, which takes SCAN many more steps
at a higher --lr and lets RCAR's sigmoid head collapse to equal scores). Each step draws B images and one of the 5 captions of each (the batch's
positives are the diagonal) and minimises the VSE++ max_violation hinge (margin 0.2, summed
over both directions):

* --loss sparse (default): rcar_fast.losses.hardest_negative_loss: all B x B pairs scored
  without autograd on --backend, then the <= 3B positives and hardest negatives recomputed
  with autograd on --pair-backend. Cost grows with B, not B^2. For an RCAR head, auto runs
  the selection pass on the fastest fused forward (the head in eval mode: the C++ CPU
  kernel, Triton on a GPU) and the recompute on a backend with a backward and RAR's dropout
  (the reference, or a fused pair backend once it has both); a requested backend that cannot
  train is one error with every reason, never a silent fallback.
* --loss full: all B x B pairs scored with autograd on --backend (that backend's backward:
  a forward-only backend, e.g. the RCAR head's "cpu" kernel, says so and stops; pick
  --backend reference or one with a backward).
* --loss infonce: all B x B pairs scored with autograd on --backend, then the symmetric
  InfoNCE of rcar_fast.losses.info_nce_loss (temperature 0.05).

Before and after training, the held-out images (--eval-images) are scored against all their
captions and R@1 / rsum are printed: training must move them up. The backends each pass runs
(as dispatch chose them for the first batch) are printed first and kept in the result.

This is the project's one trainer: examples/train_scan.py is a front end of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

from rcar_fast import data as _data
from rcar_fast import dispatch, losses, metrics, pairs, reference_math, scorers
from rcar_fast.atomic import atomic_path
from rcar_fast.losses import info_nce_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LOSSES = ("sparse", "full", "infonce")


@dataclasses.dataclass
class TrainConfig:
    model: str = "scan"               # the head: a name of rcar_fast.scorers.names()
    backend: str = "auto"             # all-pairs scoring (selection pass; the full loss)
    pair_backend: str = "auto"        # pair recompute of the sparse loss
    loss: str = "sparse"              # "sparse" | "full" | "infonce"
    steps: int = 100
    batch: int = 32
    lr: float = 1e-3
    tied_init: bool = True            # word projection starts as a copy of the region one
    margin: float = 0.2
    grad_clip: float = 2.0            # the public SCAN / RCAR training scripts clip at 2
    feat_dim: int = 128               # synthetic feature size (encoder input)
    dim: int = 128                    # joint embedding size d
    sim_dim: int = 64                 # RCAR sim_dim
    regulator: str = "coop_rcar"
    head_dropout: Optional[float] = None  # None: the official RAR dropout (0.4); 0 turns it off
    rcar_steps: int = 2
    direction: Optional[str] = None   # None: the head's default (t2i for SCAN and RCAR)
    smooth: Optional[float] = None    # None: 9 (SCAN t2i), 4 (SCAN i2t), 10 / 3 (RCAR t2i / i2t)
    regions: int = 36
    min_len: int = 6
    max_len: int = 20
    train_images: int = 400
    eval_images: int = 100
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    log_every: int = 10


@dataclasses.dataclass
class TrainResult:
    losses: list
    step_seconds: list
    eval_before: Optional[dict]
    eval_after: Optional[dict]
    config: dict
    backends: dict = dataclasses.field(default_factory=dict)   # pass -> backend (backend_plan)


class Projection(nn.Module):
    """Linear + l2norm over the last axis (stand-in for an encoder's last layer)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        # Xavier-uniform like the public encoders' fc init.
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return reference_math.l2norm(self.fc(x))


class RetrievalModel(nn.Module):
    """Region / word projections and the similarity: cfg.model's head, built by its scorer
    (a head name and keywords, or a module whose weights train with the projections)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.img_proj = Projection(cfg.feat_dim, cfg.dim)
        self.txt_proj = Projection(cfg.feat_dim, cfg.dim)
        if cfg.tied_init:
            # Both sides start in one shared random embedding, as if pretrained together;
            # untied, the hardest-negative loss must first align two random maps (slow, and
            # RCAR's sigmoid head tends to collapse to equal scores without a warm-up).
            with torch.no_grad():
                self.txt_proj.fc.weight.copy_(self.img_proj.fc.weight)
        options = dict(direction=cfg.direction, smooth=cfg.smooth, sim_dim=cfg.sim_dim,
                       regulator=cfg.regulator, steps=cfg.rcar_steps, dropout=cfg.head_dropout)
        self.similarity, self.head_kwargs = scorers.get(cfg.model).build(cfg.model, cfg.dim, options)

    def encode(self, img_feat, cap_feat, lens):
        """Regions and real words projected; padding words stay zero. Projecting padding would
        put l2norm's sqrt at an exact zero vector, whose gradient is NaN (SIMILARITY.md)."""
        real = torch.arange(cap_feat.shape[1], device=lens.device)[None, :] < lens[:, None]
        words = cap_feat.new_zeros(cap_feat.shape[:2] + (self.txt_proj.fc.out_features,))
        words = words.masked_scatter(real.unsqueeze(-1), self.txt_proj(cap_feat[real]))
        return self.img_proj(img_feat), words


def _check_config(cfg: TrainConfig):
    if cfg.model not in scorers.names():
        raise ValueError(f"model (--head) must be one of {scorers.names()}, got {cfg.model!r}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    for name in ("backend", "pair_backend"):
        if getattr(cfg, name) not in dispatch.REQUESTABLE:
            raise ValueError(f"{name} must be one of {dispatch.REQUESTABLE}, got {getattr(cfg, name)!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    for name in ("steps", "batch", "train_images", "dim", "feat_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch < 2 or cfg.batch > cfg.train_images:
        raise ValueError(f"batch must be in [2, train_images={cfg.train_images}], got {cfg.batch}")


def make_data(cfg: TrainConfig):
    """(train set, eval set or None) from the synthetic generator, on cfg.device / dtype."""
    total = cfg.train_images + cfg.eval_images
    full = _data.synthetic(n_images=total, regions=cfg.regions, dim=cfg.feat_dim,
                           min_len=cfg.min_len, max_len=cfg.max_len, seed=cfg.seed,
                           dtype=torch.float64)
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)

    def split(i0, i1):
        img = full.img[i0:i1].to(device=device, dtype=dtype)
        cap = full.cap[5 * i0:5 * i1].to(device=device, dtype=dtype)
        return _data.RetrievalSet(img, cap, full.lens[5 * i0:5 * i1].to(device))

    train_set = split(0, cfg.train_images)
    eval_set = split(cfg.train_images, total) if cfg.eval_images > 0 else None
    return train_set, eval_set


def batch_indices(generator: torch.Generator, n_images: int, batch: int):
    """B distinct images and one of the 5 captions of each (positives on the diagonal)."""
    img_ids = torch.randperm(n_images, generator=generator)[:batch]
    cap_ids = img_ids * 5 + torch.randint(0, 5, (batch,), generator=generator)
    return img_ids, cap_ids


def step_loss(model: RetrievalModel, cfg: TrainConfig, img_feat, cap_feat, lens):
    img, cap = model.encode(img_feat, cap_feat, lens)
    kw = dict(model=model.similarity, margin=cfg.margin, backend=cfg.backend, **model.head_kwargs)
    if cfg.loss == "full":
        return losses.full_hardest_negative_loss(img, cap, lens, **kw)
    if cfg.loss == "infonce":
        del kw["margin"]
        return info_nce_loss(pairs.all_pairs_scores(img, cap, lens, **kw))
    return losses.hardest_negative_loss(img, cap, lens, pair_backend=cfg.pair_backend, **kw)


def backend_plan(model: RetrievalModel, cfg: TrainConfig, img_feat, cap_feat, lens) -> dict:
    """The backend of each pass of a training step, as dispatch chooses it for this batch:
    sparse loss {"selection": the no-grad B x B pass (a head module in eval mode, as
    hardest_negative_loss runs it), "pairs": the recompute with autograd}; full / InfoNCE
    {"all_pairs": ...}. Raises dispatch's error (every backend's reasons) if a pass has none."""
    img, cap = model.encode(img_feat, cap_feat, lens)
    scoring = scorers.scoring(model.similarity, model.head_kwargs, img)
    ops = scoring.scorer
    if cfg.loss != "sparse":
        return {"all_pairs": scoring.choose(ops.all_pairs_op, cfg.backend, img, cap, lens).backend}
    pairs_backend = scoring.choose(ops.pairs_op, cfg.pair_backend, img, cap, lens).backend
    head = scoring.module
    was_training = head is not None and head.training
    try:
        if was_training:
            head.eval()
        with torch.no_grad():
            detached = (img.detach(), cap.detach(), lens)
            selection = scoring.choose(ops.all_pairs_op, cfg.backend, *detached).backend
    finally:
        if was_training:
            head.train()
    return {"selection": selection, "pairs": pairs_backend}


@torch.no_grad()
def evaluate(model: RetrievalModel, cfg: TrainConfig, eval_set) -> dict:
    """Recall metrics of all eval images against all their captions."""
    was_training = model.training
    model.eval()
    img, cap = model.encode(eval_set.img, eval_set.cap, eval_set.lens)
    sims = pairs.all_pairs_scores(img, cap, eval_set.lens, model=model.similarity,
                                  backend=cfg.backend, **model.head_kwargs)
    model.train(was_training)
    return metrics.recall_metrics(sims.float().cpu(), captions_per_image=5)


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Runs cfg.steps optimiser steps from cfg.seed; returns the loss of every step."""
    _check_config(cfg)
    torch.manual_seed(cfg.seed)
    train_set, eval_set = make_data(cfg)
    model = RetrievalModel(cfg).to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_before = evaluate(model, cfg, eval_set) if eval_set is not None else None
    losses, seconds, chosen = [], [], {}
    model.train()
    for step in range(cfg.steps):
        img_ids, cap_ids = batch_indices(generator, cfg.train_images, cfg.batch)
        lens = train_set.lens[cap_ids.to(train_set.lens.device)]
        longest = int(lens.max())
        batch = (train_set.img[img_ids], train_set.cap[cap_ids, :longest], lens)
        if step == 0:
            chosen = backend_plan(model, cfg, *batch)
            if log is not None:
                log("backends: " + ", ".join(f"{name} {be}" for name, be in chosen.items()))
        start = time.perf_counter()
        loss = step_loss(model, cfg, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if torch.cuda.is_available() and cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.4f}  ({seconds[-1] * 1e3:.1f} ms)")
    eval_after = evaluate(model, cfg, eval_set) if eval_set is not None else None
    return TrainResult(losses, seconds, eval_before, eval_after, dataclasses.asdict(cfg), chosen)


def add_example_arguments(parser: argparse.ArgumentParser, *, lr: float) -> None:
    """The options the example front ends (examples/train_*.py) share, with their small
    defaults; example_config maps them onto a TrainConfig."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--direction", default="t2i", choices=("t2i", "i2t"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="synthetic training images")
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--dim", type=int, default=32, help="synthetic feature size")
    parser.add_argument("--embed", type=int, default=32, help="joint space size d")
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)


def example_config(args: argparse.Namespace, **head_options) -> TrainConfig:
    """The TrainConfig of an example's options (add_example_arguments, and --backend, --dtype):
    held-out one batch of images; head_options are the example's own (model, loss, ...)."""
    return TrainConfig(
        backend=args.backend, direction=args.direction, steps=args.steps, batch=args.batch,
        train_images=args.images, eval_images=args.batch, regions=args.regions,
        feat_dim=args.dim, dim=args.embed, max_len=args.max_len,
        min_len=min(TrainConfig.min_len, args.max_len), lr=args.lr, seed=args.seed,
        log_every=args.log_every, dtype=args.dtype, device=args.device, **head_options)


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m rcar_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", "--model", dest="model", choices=scorers.names(),
                        default=defaults.model, help="the similarity head (rcar_fast.scorers)")
    parser.add_argument("--backend", choices=dispatch.REQUESTABLE, default=defaults.backend,
                        help="backend of the all-pairs scoring (selection pass / full loss)")
    parser.add_argument("--pair-backend", choices=dispatch.REQUESTABLE, default=defaults.pair_backend,
                        help="backend of the sparse loss' pair recompute")
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--direction", default=defaults.direction,
                        help="the head's direction (default: the head's own)")
    parser.add_argument("--regulator", choices=reference_math.REGULATORS, default=defaults.regulator)
    for name in ("steps", "batch", "feat_dim", "dim", "sim_dim", "rcar_steps", "regions",
                 "min_len", "max_len", "train_images", "eval_images", "seed", "log_every"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "margin", "grad_clip", "smooth", "head_dropout"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--untied-init", dest="tied_init", action="store_false",
                        help="start the word projection independently of the region one")
    parser.add_argument("--json", help="write losses, step times and metrics to this file")
    return parser


def run(cfg: TrainConfig, json_path: Optional[str] = None) -> TrainResult:
    """train(cfg) with its progress on stdout, then the held-out metrics before / after and
    the median step time; writes the result as JSON to ``json_path`` when given."""
    print(f"training {cfg.model} ({cfg.loss} loss, backend {cfg.backend}) for {cfg.steps} steps, "
          f"B={cfg.batch}, d={cfg.dim}, {cfg.dtype} on {cfg.device}", flush=True)
    result = train(cfg, log=lambda line: print(line, flush=True))
    for name, metrics_ in (("before", result.eval_before), ("after", result.eval_after)):
        if metrics_ is not None:
            print(f"held-out {name:6s}: i2t R@1 {metrics_['i2t_r1']:.1f}  t2i R@1 {metrics_['t2i_r1']:.1f}  "
                  f"rsum {metrics_['rsum']:.1f}")
    steady = result.step_seconds[1:] or result.step_seconds
    print(f"median step {sorted(steady)[len(steady) // 2] * 1e3:.1f} ms")
    if json_path:
        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    return result


def run_or_complain(cfg: TrainConfig, json_path: Optional[str] = None,
                    prog: str = "python -m rcar_fast.train") -> int:
    """run(cfg) as a command: a bad option (say --direction for the chosen --head), or a
    backend that cannot run a pass (dispatch's error with every reason, raised before the
    first step), is one line on stderr and exit status 2, not a traceback."""
    try:
        _check_config(cfg)
        model = RetrievalModel(cfg)
        scorers.scoring(model.similarity, model.head_kwargs)   # the head's settings checked
        complaint = None
    except (ValueError, TypeError) as err:
        complaint = err
    if complaint is None:
        try:
            run(cfg, json_path)
        except dispatch.BackendUnavailable as err:
            complaint = err
    if complaint is not None:
        print(f"{prog}: error: {complaint}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    json_path = args.pop("json")
    return run_or_complain(TrainConfig(**args), json_path)


if __name__ == "__main__":
    sys.exit(main())
