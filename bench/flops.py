"""FLOP models of the benchmarks: rcar_fast.flops (the models live in the package, where each
head's scorer reads its own; see rcar_fast.ops.scorer). The names here are those the
benchmarks and bench/cpu_quick.py have always used."""
from rcar_fast.flops import (MODE_FACTOR, rcar_forward, rcar_pair, rcar_pairs_forward,  # noqa: F401
                             scan_forward, scan_pairs_forward)
