"""Quick CPU benchmark: the C++ CPU backend against the reference loop and vectorised forms.

SCAN (t2i by default) and the RCAR head (coop_rcar, 2 steps) at (n_img, n_cap) = (100, 500),
d = 1024, R = 36, caption lengths uniform in 6..30. Prints wall times, speed-ups, the GFLOP/s
of each run (useful FLOPs, see below) and its share of this machine's fp32 GEMM rate measured
with torch.mm, plus the load average: on a shared machine, run it a few times.

Useful FLOPs: the GEMM FLOPs of bench/flops.py (``gemm_only=True``). SCAN, the word-region
GEMM only (2 * words * regions * d over all pairs; the Gram identity needs nothing
d-dimensional besides it). RCAR, every matrix product of the head per query row (raw scores,
attended context, alignment vectors, RCR MLPs, RAR keys).

    python bench/cpu_quick.py                  # everything (the RCAR loop reference takes a while)
    python bench/cpu_quick.py --skip-loop      # without the loop references
    python bench/cpu_quick.py --only scan --direction i2t
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rcar_fast  # noqa: E402
from bench import flops as _flops  # noqa: E402
from rcar_fast import reference  # noqa: E402
from rcar_fast.modules import RCARSimilarity  # noqa: E402


def timed(fn, repeat):
    """Best wall time of `repeat` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def gemm_rate(size=4096, repeat=3):
    a, b = torch.randn(size, 1024), torch.randn(1024, size)
    a @ b
    seconds, _ = timed(lambda: a @ b, repeat)
    return 2 * size * size * 1024 / seconds / 1e9


def make_inputs(n_img, n_cap, R, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, R, d, generator=gen), dim=-1)
    lens = torch.randint(6, 31, (n_cap,), generator=gen)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, 30, d, generator=gen), dim=-1)
    for j in range(n_cap):
        cap[j, int(lens[j]):] = float("nan")  # padding is never read
    return img, cap, lens


def scan_flops(img, lens, direction):
    n_img, R, d = img.shape
    return _flops.scan_forward(n_img, lens.tolist(), R, d, direction, gemm_only=True)


def rcar_flops(head, img, lens):
    n_img, R, d = img.shape
    return _flops.rcar_forward(n_img, lens.tolist(), R, d, head.sim_dim, head.regulator,
                               head.steps, head.direction, gemm_only=True)


def report(name, seconds, flops, gemm):
    rate = flops / seconds / 1e9
    print(f"  {name:<22s} {seconds:8.3f} s  {rate:7.1f} GFLOP/s  {100 * rate / gemm:5.1f}% of GEMM", flush=True)


def bench_scan(args, img, cap, lens, gemm):
    kw = dict(direction=args.direction, raw_norm="clipped_l2norm", smooth=9.0 if args.direction == "t2i" else 4.0,
              agg="mean", lse_lambda=6.0)
    flops = scan_flops(img, lens, args.direction)
    print(f"SCAN {args.direction}, {img.shape[0]} x {cap.shape[0]} pairs, useful {flops / 1e9:.1f} GFLOP "
          f"(floor at the GEMM rate: {flops / gemm / 1e9:.3f} s)")
    cpu_s, cpu_out = timed(lambda: rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw), args.repeat)
    report("cpu backend", cpu_s, flops, gemm)
    vec_s, vec_out = timed(lambda: reference.scan_similarity_vectorized(img, cap, lens, **kw), 1)
    report("reference vectorised", vec_s, flops, gemm)
    print(f"  -> cpu is {vec_s / cpu_s:.1f}x faster than the vectorised reference "
          f"(max |diff| {(cpu_out - vec_out).abs().max().item():.1e})")
    if not args.skip_loop:
        loop_s, _ = timed(lambda: reference.scan_similarity_loop(img, cap, lens, **kw), 1)
        report("reference loop", loop_s, flops, gemm)
        print(f"  -> cpu is {loop_s / cpu_s:.1f}x faster than the loop reference")
    if args.backward:
        img_g, cap_g = img.clone().requires_grad_(), cap.clone().requires_grad_()
        grad = torch.randn(img.shape[0], cap.shape[0])

        def cpu_backward():
            out = rcar_fast.scan_similarity(img_g, cap_g, lens, backend="cpu", **kw)
            out.backward(grad)
        back_s, _ = timed(cpu_backward, args.repeat)
        report("cpu forward+backward", back_s, 3 * flops, gemm)


def bench_rcar(args, img, cap, lens, gemm):
    torch.manual_seed(0)
    head = RCARSimilarity(regulator="coop_rcar", steps=2, direction=args.direction,
                          smooth=10.0 if args.direction == "t2i" else 3.0).eval()
    flops = rcar_flops(head, img, lens)
    print(f"RCAR coop_rcar(2) {args.direction}, {img.shape[0]} x {cap.shape[0]} pairs, useful {flops / 1e12:.2f} TFLOP "
          f"(floor at the GEMM rate: {flops / gemm / 1e9:.2f} s)")
    with torch.no_grad():
        cpu_s, cpu_out = timed(lambda: head(img, cap, lens, backend="cpu"), args.repeat)
        report("cpu backend", cpu_s, flops, gemm)
        if not args.skip_vectorized:
            vec_s, vec_out = timed(lambda: head.forward_vectorized(img, cap, lens), 1)
            report("reference vectorised", vec_s, flops, gemm)
            print(f"  -> cpu is {vec_s / cpu_s:.1f}x faster than the vectorised reference "
                  f"(max |diff| {(cpu_out - vec_out).abs().max().item():.1e})")
        if not args.skip_loop:
            loop_s, _ = timed(lambda: head.forward_loop(img, cap, lens), 1)
            report("reference loop", loop_s, flops, gemm)
            print(f"  -> cpu is {loop_s / cpu_s:.1f}x faster than the loop reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-img", type=int, default=100)
    parser.add_argument("--n-cap", type=int, default=500)
    parser.add_argument("--direction", choices=("t2i", "i2t"), default="t2i")
    parser.add_argument("--only", choices=("scan", "rcar"))
    parser.add_argument("--repeat", type=int, default=3, help="runs of the cpu backend (best is kept)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the (slow) loop references")
    parser.add_argument("--skip-vectorized", action="store_true", help="skip the RCAR vectorised reference")
    parser.add_argument("--backward", action="store_true", help="also time the SCAN cpu backward")
    args = parser.parse_args()

    torch.manual_seed(0)
    img, cap, lens = make_inputs(args.n_img, args.n_cap, 36, 1024)
    load_before = os.getloadavg()
    gemm = gemm_rate()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before[0]:.1f}, "
          f"fp32 GEMM rate {gemm:.0f} GFLOP/s (torch.mm 4096 x 1024 x 4096)")
    if args.only in (None, "scan"):
        bench_scan(args, img, cap, lens, gemm)
    if args.only in (None, "rcar"):
        bench_rcar(args, img, cap, lens, gemm)
    print(f"load average after: {os.getloadavg()[0]:.1f}; GEMM rate after: {gemm_rate():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
