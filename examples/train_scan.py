"""Train small image/text projections through the SCAN similarity on the synthetic set.

    python examples/train_scan.py --backend triton            # on a GPU
    TRITON_INTERPRET=1 python examples/train_scan.py --backend triton --steps 5   # CPU, slow
    python examples/train_scan.py --backend reference --loss infonce

A front end of the project's trainer, rcar_fast.train (``python -m rcar_fast.train`` has
every option and every head of the registry, ``--head rcar|chan|laps|...``), with small
defaults. Each step draws B images and one
of each image's captions, projects both with a learned linear layer (+ l2norm, like the SCAN
encoders' last step), scores all B x B pairs with the SCAN similarity on --backend (the
backward flows through it) and applies the VSE++ hardest-negative hinge loss (--loss vse)
or the symmetric InfoNCE (--loss infonce). R@1 on held-out images is printed before and
after training.
"""
from __future__ import annotations

import argparse
import os
import sys

# This script's --loss names -> rcar_fast.train's (both score all B x B pairs with autograd).
LOSSES = {"vse": "full", "infonce": "infonce"}


def parse_args(argv=None):
    from rcar_fast.train import add_example_arguments  # after __main__ put the checkout on sys.path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto",
                   help="scan backend: auto, triton, reference, reference_loop, cpu, cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--loss", default="vse", choices=tuple(LOSSES))
    add_example_arguments(p, lr=1e-2)
    return p.parse_args(argv)


def config(args):
    """The rcar_fast.train configuration of these arguments (held-out: one batch of images)."""
    from rcar_fast.train import example_config

    return example_config(args, model="scan", loss=LOSSES[args.loss])


def main(argv=None):
    """Trains; returns the loss of every step."""
    args = parse_args(argv)
    if args.backend == "triton" and args.device == "cpu":
        # Triton on CPU tensors is its interpreter; it must be on before any kernel loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from rcar_fast.train import run

    return run(config(args)).losses


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
