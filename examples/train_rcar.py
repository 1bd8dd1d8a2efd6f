"""Train an RCAR head (and small image/text projections) on the synthetic set with the sparse
hardest-negative loss.

    python examples/train_rcar.py                                # auto: fused selection pass
    python examples/train_rcar.py --backend reference --loss full
    python examples/train_rcar.py --regulator only_rcr --rcar-steps 1 --steps 50
    TRITON_INTERPRET=1 python examples/train_rcar.py --backend triton --steps 3   # CPU, slow

A front end of the project's trainer, rcar_fast.train (``python -m rcar_fast.train --head
rcar`` has every option), with small defaults. Each step draws B images and one of each
image's captions, projects both (Linear + l2norm) and minimises the VSE++ max_violation
hinge through the RCAR head:

* --loss sparse (default): the B x B scores without an autograd graph on --backend (auto:
  the fused forward kernel, the head in eval mode), then the <= 3B positive and
  hardest-negative pairs rescored with autograd on --pair-backend (auto: a backend with a
  backward and RAR's dropout);
* --loss full: all B x B pairs with autograd on --backend (its backward).

The backends each pass runs are printed first; R@1 on held-out images before and after.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    # after __main__ put the checkout on sys.path
    from rcar_fast.contract import REGULATORS
    from rcar_fast.train import add_example_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto",
                   help="B x B scoring: auto, cpu, triton, cuda, reference, reference_loop")
    p.add_argument("--pair-backend", default="auto", help="the sparse loss' pair recompute")
    p.add_argument("--loss", default="sparse", choices=("sparse", "full"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--regulator", default="coop_rcar", choices=REGULATORS)
    p.add_argument("--rcar-steps", type=int, default=2, help="regulator steps")
    p.add_argument("--head-dropout", type=float, default=None,
                   help="RAR dropout p (default: the official 0.4; 0 turns it off)")
    p.add_argument("--sim-dim", type=int, default=16, help="RCAR sim_dim")
    add_example_arguments(p, lr=5e-3)
    return p.parse_args(argv)


def config(args):
    """The rcar_fast.train configuration of these arguments (held-out: one batch of images)."""
    from rcar_fast.train import example_config

    return example_config(args, model="rcar", pair_backend=args.pair_backend, loss=args.loss,
                          regulator=args.regulator, rcar_steps=args.rcar_steps,
                          head_dropout=args.head_dropout, sim_dim=args.sim_dim)


def main(argv=None) -> int:
    """Trains; exit status 0, or 2 with one line on stderr for a setting or backend that
    cannot train (dispatch's reasons)."""
    args = parse_args(argv)
    if args.backend == "triton" and args.device == "cpu":
        # Triton on CPU tensors is its interpreter; it must be on before any kernel loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from rcar_fast.train import run_or_complain

    return run_or_complain(config(args), prog="examples/train_rcar.py")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
