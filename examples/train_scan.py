"""Train small image/text projections through the SCAN similarity on the synthetic set.

    python examples/train_scan.py --backend triton            # on a GPU
    TRITON_INTERPRET=1 python examples/train_scan.py --backend triton --steps 5   # CPU, slow
    python examples/train_scan.py --backend reference --loss infonce

Each step draws B images and one of each image's captions, projects both with a learned
linear layer (+ l2norm, like the SCAN encoders' last step), scores all B x B pairs with
rcar_fast.scan_similarity (the backward flows through the chosen backend), and applies the
VSE++ hardest-negative hinge loss (or InfoNCE). The loss on a fixed held-out batch and its
R@1 are printed before and after training.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projection(nn.Module):
    """Linear maps of regions and words into the joint space, l2-normalised per vector."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.img_fc = nn.Linear(dim_in, dim_out)
        self.txt_fc = nn.Linear(dim_in, dim_out)

    def forward(self, img, cap):
        return F.normalize(self.img_fc(img), dim=-1), F.normalize(self.txt_fc(cap), dim=-1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto",
                   help="scan backend: auto, triton, reference, reference_loop, cpu, cuda")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--loss", default="vse", choices=("vse", "infonce"))
    p.add_argument("--direction", default="t2i", choices=("t2i", "i2t"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="synthetic training images")
    p.add_argument("--regions", type=int, default=8)
    p.add_argument("--dim", type=int, default=32, help="synthetic feature size")
    p.add_argument("--embed", type=int, default=32, help="joint space size")
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    return p.parse_args(argv)


def _batch(data, image_ids, generator):
    """B images and, for each, one of its captions (caption k*i + c), trimmed to the batch's
    longest caption."""
    per_image = data.captions_per_image
    caption_ids = image_ids * per_image + torch.randint(per_image, image_ids.shape, generator=generator)
    lens = data.lens[caption_ids]
    cap = data.cap[caption_ids, :int(lens.max())]
    return data.img[image_ids], cap, lens


def _scores(model, img, cap, lens, args, dtype):
    from rcar_fast import scan_similarity

    img_e, cap_e = model(img, cap)
    smooth, lse_lambda = (9.0, 6.0) if args.direction == "t2i" else (4.0, 5.0)
    return scan_similarity(img_e.to(dtype), cap_e.to(dtype), lens, direction=args.direction,
                           smooth=smooth, lse_lambda=lse_lambda, backend=args.backend).float()


def _loss(sims, kind):
    from rcar_fast.losses import info_nce_loss, vse_hinge_loss

    return vse_hinge_loss(sims) if kind == "vse" else info_nce_loss(sims)


def _recall_at_1(sims):
    """Text-to-image R@1 in percent on a (B, B) matrix with positives on the diagonal."""
    return 100.0 * (sims.argmax(dim=0) == torch.arange(sims.shape[0], device=sims.device)).float().mean().item()


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "triton" and args.device == "cpu":
        # Triton on CPU tensors is its interpreter; it must be on before any kernel loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from rcar_fast.data import synthetic

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    data = synthetic(n_images=args.images, regions=args.regions, dim=args.dim,
                     max_len=args.max_len, seed=args.seed)
    data = type(data)(*(t.to(device) for t in data))
    model = Projection(args.dim, args.embed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    held_out = _batch(data, torch.arange(min(args.batch, args.images)), generator)
    with torch.no_grad():
        before = _scores(model, *held_out, args, dtype)
    print(f"held-out: loss {_loss(before, args.loss).item():.4f}  R@1 {_recall_at_1(before):.1f}%")

    losses = []
    start = time.time()
    for step in range(1, args.steps + 1):
        image_ids = torch.randperm(args.images, generator=generator)[:args.batch].to(device)
        sims = _scores(model, *_batch(data, image_ids.cpu(), generator), args, dtype)
        loss = _loss(sims, args.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.time() - start:.1f}s)")

    with torch.no_grad():
        after = _scores(model, *held_out, args, dtype)
    print(f"held-out: loss {_loss(after, args.loss).item():.4f}  R@1 {_recall_at_1(after):.1f}%")
    return losses


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
