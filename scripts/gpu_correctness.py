"""Correctness pass of every GPU backend (Triton and CUDA) against the float64 reference, at
small sizes, for scripts/gpu_check.sh.

Cases: SCAN t2i/i2t in bf16/fp16/fp32 (two option sets), RCAR only_rar / only_rcr / coop_rcar
in both directions and the three dtypes, the S-only heads (max_similarity) t2i/i2t/both in the
three dtypes (MAXSIM_OPTION_SETS: every pool, leaky on and off) and CHAN's VSA coding (i2t, every
pool, CUDA: the Triton heads do not take it); each on ragged caption lengths
(1 and Lmax among them, sizes off the tile sizes; the heads also ragged in regions), NaN in
every padding position. Per case up to three checks:
forward through the public API, the kernel writing every entry of a NaN-poisoned output, and
gradients (SCAN on both backends, RCAR on Triton: the CUDA RCAR kernel is forward only). The
rule is tests/tolerances.py's (fp32: relative 1e-4; fp16/bf16: 2x the reference's own error in
that precision plus atol).

Prints one line per case (PASS / FAIL / SKIP with the worst error and its bound, or why),
writes correctness.json and correctness.csv into --out; exits 1 if any case failed (or none
passed), 3 if --budget-s left cases unrun, else 0.

--dry-run: a CPU machine's rehearsal. GPUs are hidden, Triton runs in its CPU interpreter on
CPU tensors at tiny sizes (bf16 is refused there: skipped with the reason), CUDA cases skip, and
so do the heads' cases (GPU only: their coverage on the CPU is the backends' own test files).
"""
import argparse
import copy
import csv
import io
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for correctness.json / correctness.csv")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: interpreter, tiny sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-k", dest="keyword", default="", help="only cases whose name contains this")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds: the rest are reported as skipped "
                        "(out of time) and the exit status is 3, so that a caller's timeout never "
                        "cuts the report")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.dry_run:
    # Before torch and triton load: triton fixes interpreter vs compile when kernels/*.py are
    # decorated, torch reads CUDA_VISIBLE_DEVICES when CUDA initialises.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("RCAR_FAST_AUTOTUNE", "quick")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import rcar_fast  # noqa: E402
from rcar_fast import contract, dispatch  # noqa: E402
from rcar_fast import reference as ref  # noqa: E402
from rcar_fast.cli import _write_json  # noqa: E402
from rcar_fast.modules import RCARSimilarity  # noqa: E402
from tests.tolerances import error_and_bound  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCAN_SETTINGS = {"t2i": (9.0, 6.0), "i2t": (4.0, 20.0)}  # the published (smooth, lse_lambda)
SCAN_OPTION_SETS = (("clipped_l2norm", "mean"), ("softmax", "lse"))
RCAR_CASES = [  # (regulator, steps, direction, dtype, with gradients on Triton)
    ("only_rar", 1, "t2i", "fp32", False), ("only_rar", 2, "i2t", "bf16", False),
    ("only_rcr", 1, "i2t", "fp32", False), ("only_rcr", 2, "t2i", "fp16", False),
    ("coop_rcar", 2, "t2i", "fp32", True), ("coop_rcar", 2, "i2t", "bf16", False),
    ("coop_rcar", 2, "t2i", "fp16", False),
]
# Sizes: regions, feature dim (off the tile sizes), caption lengths (ragged, 1 and the longest
# included), RCAR sim_dim. Captions are padded 2 words beyond the longest. On a GPU the lengths
# stay within one power-of-two bucket (<= 8): each bucket is its own kernel specialisation, and
# compiles, not sizes, are what this pass spends its minutes on.
SIZES = {
    False: dict(n_img=5, regions=36, dim=100, lens=(1, 8, 6, 3, 5, 8, 2, 7, 4), sim_dim=32),
    True: dict(n_img=3, regions=5, dim=20, lens=(1, 7, 3, 5, 2), sim_dim=16),
}[ARGS.dry_run]


class Skip(Exception):
    """The case cannot run here; the message says why."""


class Case:
    def __init__(self, name, backend, run):
        self.name, self.backend, self.run = name, backend, run


# ---------------------------------------------------------------------------------------------
# Inputs and helpers
# ---------------------------------------------------------------------------------------------

def device_for(backend):
    if backend == "triton":
        return "cuda" if HAS_GPU else "cpu"  # CPU only under the interpreter (dry run)
    return "cuda"


def check_usable(op, backend, device, dtype):
    """Skip (dry run / no GPU) or fail (a GPU machine where a GPU backend cannot run)."""
    if backend == "cuda" and not HAS_GPU:
        raise Skip("skipped: no GPU")
    reason = dispatch.rejection(op, backend, torch.device(device), dtype)
    if reason is None:
        return
    if not HAS_GPU:
        raise Skip(f"skipped: {reason}")
    raise RuntimeError(f"backend {backend} unavailable on a GPU machine: {reason}")


def make_inputs(device, dtype, seed, min_len=1):
    """img (n_img, R, d), cap (n_cap, Lmax + 2, d) with NaN in every padding position, lens
    (SIZES' lengths, raised to min_len)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(SIZES["lens"]).clamp(min=min_len)
    max_len = int(lens.max()) + 2
    img = torch.randn(SIZES["n_img"], SIZES["regions"], SIZES["dim"], generator=gen, dtype=torch.float64)
    cap = torch.randn(len(lens), max_len, SIZES["dim"], generator=gen, dtype=torch.float64)
    img = torch.nn.functional.normalize(img, dim=-1)  # encoders l2-normalise their features
    cap = torch.nn.functional.normalize(cap, dim=-1)
    cap[torch.arange(max_len)[None, :] >= lens[:, None]] = float("nan")
    return img.to(device, dtype), cap.to(device, dtype), lens.to(device)


def shortest_caption(dtype):
    """1, except in float16: there the reference itself overflows at 1-word captions (the
    l2-normalisation over a single word, x/|x|, has a 1/|x| derivative; SCAN's clipped_l2norm
    backward and RCAR's forward reach inf/NaN past 65504), which leaves the 2x rule without a
    bound. fp32 and bf16 (fp32's range) keep the 1-word caption."""
    return 2 if dtype == torch.float16 else 1


def real_words(lens, max_len):
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def poison_allocator(device):
    """Fill the CUDA caching allocator's free blocks with NaN, so that outputs allocated from
    them start as NaN: a kernel that leaves an entry unwritten shows up as non-finite."""
    if device != "cuda":
        return
    blocks = [torch.full((2**18,), float("nan"), device=device) for _ in range(16)]  # small pool
    blocks.append(torch.full((2**24,), float("nan"), device=device))  # large pool, 64 MiB
    del blocks


def measure(checks, what, out, ref64, dtype, ref_lowp=None):
    err, bound = error_and_bound(out, ref64, dtype=dtype, ref_lowp=ref_lowp)
    if not math.isfinite(bound):
        what += f" (the {dtype} reference is not finite here: the 2x rule has no bound)"
    checks.append(dict(what=what, err=err, bound=bound, ok=err <= bound))


def measure_zero(checks, what, values):
    """Entries that must be exactly zero (gradients in the caption padding)."""
    err = values.abs().max().item() if values.numel() else 0.0
    checks.append(dict(what=what, err=err, bound=0.0, ok=err == 0.0))


def gradients(fn, img, cap, weights):
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    out = fn(img, cap)
    (out * weights.to(out.dtype)).sum().backward()
    return img.grad, cap.grad


# ---------------------------------------------------------------------------------------------
# SCAN
# ---------------------------------------------------------------------------------------------

def scan_options(direction, raw_norm, agg):
    smooth, lse_lambda = SCAN_SETTINGS[direction]
    return dict(direction=direction, raw_norm=raw_norm, agg=agg, smooth=smooth, lse_lambda=lse_lambda)


def scan_poisoned(backend, img, cap, lens, opts):
    """The backend's forward kernel writing into a NaN-filled output it is handed."""
    out = torch.full((img.shape[0], cap.shape[0]), float("nan"), device=img.device)
    if backend == "triton":
        from rcar_fast.kernels import scan as kernels

        return kernels.scan_forward(kernels.build_problem(img, cap, lens, **opts), out=out)
    from rcar_fast.ops import scan as scan_ops

    options = scan_ops.Options(opts["direction"], opts["raw_norm"], float(opts["smooth"]), opts["agg"],
                                float(opts["lse_lambda"]))
    return scan_ops.scan_forward(img, cap, lens, options, out=out)


def scan_case(backend, direction, dtype_name, seed):
    def run():
        dtype = DTYPES[dtype_name]
        device = device_for(backend)
        check_usable("scan", backend, device, dtype)
        img, cap, lens = make_inputs(device, dtype, seed, min_len=shortest_caption(dtype))
        low = dtype not in (torch.float32, torch.float64)
        checks = []
        for raw_norm, agg in SCAN_OPTION_SETS:
            opts = scan_options(direction, raw_norm, agg)
            ref64 = ref.scan_similarity_vectorized(img.double(), cap.double(), lens, **opts)
            lowp = ref.scan_similarity_vectorized(img, cap, lens, **opts) if low else None
            poison_allocator(device)
            out = rcar_fast.scan_similarity(img, cap, lens, backend=backend, **opts)
            measure(checks, f"forward {raw_norm}/{agg}", out, ref64, dtype, lowp)
        measure(checks, f"poisoned output {raw_norm}/{agg}", scan_poisoned(backend, img, cap, lens, opts),
                ref64, dtype, lowp)
        # Gradients (the published t2i/i2t options): the kernel's backward vs autograd through
        # the float64 reference, same weights; zero in the caption padding.
        opts = scan_options(direction, "clipped_l2norm", "mean")
        weights = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + 1)).to(device)
        poison_allocator(device)
        dimg, dcap = gradients(lambda a, c: rcar_fast.scan_similarity(a, c, lens, backend=backend, **opts),
                               img, cap, weights)
        rimg, rcap = gradients(lambda a, c: ref.scan_similarity_vectorized(a, c, lens, **opts),
                               img.double(), cap.double(), weights)
        limg = lcap = None
        if low:
            limg, lcap = gradients(lambda a, c: ref.scan_similarity_vectorized(a, c, lens, **opts),
                                   img, cap, weights)
        real = real_words(lens, cap.shape[1])
        measure(checks, "d img", dimg, rimg, dtype, limg)
        measure(checks, "d cap (real words)", dcap[real], rcap[real], dtype, None if lcap is None else lcap[real])
        measure_zero(checks, "d cap (padding)", dcap[~real].float())
        return checks

    return Case(f"scan/{backend}/{direction}/{dtype_name}", backend, run)


# ---------------------------------------------------------------------------------------------
# RCAR
# ---------------------------------------------------------------------------------------------

def make_head(regulator, steps, direction, device, seed):
    torch.manual_seed(seed)
    head = RCARSimilarity(embed_dim=SIZES["dim"], sim_dim=SIZES["sim_dim"], regulator=regulator,
                          steps=steps, direction=direction, smooth=10.0 if direction == "t2i" else 3.0)
    with torch.no_grad():  # the official init zeroes every bias; random ones get checked too
        for name, p in head.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return head.eval().to(device)


def rcar_poisoned(backend, head, img, cap, lens):
    if backend == "triton":
        from rcar_fast.kernels import rcar as kernels
        from rcar_fast.ops.rcar import pack_weights

        out = torch.full((img.shape[0], cap.shape[0]), float("nan"), device=img.device)
        op_dtype = torch.float32 if img.dtype == torch.float32 else img.dtype
        return kernels.rcar_forward(img.contiguous(), cap.contiguous(), lens.tolist(),
                                    pack_weights(head, op_dtype, img.device.type == "cpu"),
                                    regulator=head.regulator, steps=head.steps,
                                    direction=head.direction, smooth=head.smooth, out=out)
    poison_allocator(img.device.type)  # the CUDA op takes no output buffer
    with torch.no_grad():
        return head(img, cap, lens, backend=backend)


def rcar_case(backend, regulator, steps, direction, dtype_name, with_grads, seed):
    def run():
        dtype = DTYPES[dtype_name]
        device = device_for(backend)
        check_usable("rcar", backend, device, dtype)
        img, cap, lens = make_inputs(device, dtype, seed, min_len=shortest_caption(dtype))
        lens = lens.cpu()  # as the RCAR tests pass them (the ops move them where needed)
        head = make_head(regulator, steps, direction, device, seed)
        with torch.no_grad():
            ref64 = copy.deepcopy(head).double().forward_loop(img.double(), cap.double(), lens)
            lowp = None
            if dtype != torch.float32:
                lowp = copy.deepcopy(head).to(dtype).forward_loop(img, cap, lens)
        # The Triton kernel takes its GEMM operands in the head's dtype (as trained with
        # autocast off); the CUDA kernel converts fp32 weights itself.
        kernel_head = copy.deepcopy(head).to(dtype) if backend == "triton" else head
        checks = []
        poison_allocator(device)
        with torch.no_grad():
            out = kernel_head(img, cap, lens, backend=backend)
        measure(checks, "forward", out, ref64, dtype, lowp)
        measure(checks, "poisoned output", rcar_poisoned(backend, kernel_head, img, cap, lens),
                ref64, dtype, lowp)
        if with_grads and backend == "triton":
            weights = torch.randn(img.shape[0], cap.shape[0], generator=torch.Generator().manual_seed(seed + 1))
            weights = weights.to(device)
            head64 = copy.deepcopy(head).double()
            rimg, rcap = gradients(lambda a, c: head64.forward_loop(a, c, lens), img.double(), cap.double(),
                                   weights.double())
            dimg, dcap = gradients(lambda a, c: head(a, c, lens, backend=backend), img, cap, weights)
            real = real_words(lens, cap.shape[1])
            measure(checks, "d img", dimg, rimg, dtype)
            measure(checks, "d cap (real words)", dcap[real], rcap[real], dtype)
            measure_zero(checks, "d cap (padding)", dcap[~real].float())
        return checks

    return Case(f"rcar/{backend}/{regulator}{steps}/{direction}/{dtype_name}", backend, run)


# ---------------------------------------------------------------------------------------------
# The S-only heads (max_similarity)
# ---------------------------------------------------------------------------------------------

MAXSIM_OPTION_SETS = (("mean", False), ("sum", True), ("max", False), ("lse", True), ("softmax", False))
MAXSIM_TAU, MAXSIM_BOTH_SCALE = 0.5, 0.5
MAXSIM_VSA_TAU = 0.1   # CHAN's alpha


def make_region_lens(n_img, R, seed):
    """Ragged region counts: the first image full, the last a single region."""
    lens = torch.randint(1, R + 1, (n_img,), generator=torch.Generator().manual_seed(seed + 7))
    lens[0], lens[-1] = R, 1
    return lens


def maxsim_poisoned(backend, img, cap, lens, img_lens, settings):
    """The CUDA forward kernel writing into a NaN-filled output it is handed; other backends
    through the public API from a NaN-filled allocator."""
    if backend == "cuda":
        from rcar_fast.ops import maxsim as maxsim_ops

        out = torch.full((img.shape[0], cap.shape[0]), float("nan"), device=img.device)
        return maxsim_ops.maxsim_forward(img, cap, lens, img_lens, maxsim_ops.Options(**settings), out=out)
    poison_allocator(img.device.type)
    return rcar_fast.max_similarity(img, cap, lens, img_lens=img_lens, backend=backend, **settings)


def maxsim_case(backend, direction, dtype_name, seed, coding="max"):
    vsa = coding == "vsa"
    coding_settings = dict(coding="vsa", vsa_tau=MAXSIM_VSA_TAU) if vsa else {}
    option_sets = tuple((pool, leaky and not vsa) for pool, leaky in MAXSIM_OPTION_SETS)  # VSA: no leaky

    def run():
        if ARGS.dry_run:
            raise Skip("skipped: no GPU (the heads' cases run on a GPU only, not in the dry run's "
                       "interpreter; tests/test_maxsim_*.py cover the CPU side)")
        from rcar_fast.reference_heads import max_similarity_reference

        dtype = DTYPES[dtype_name]
        device = device_for(backend)
        check_usable("maxsim", backend, device, dtype)
        img, cap, lens = make_inputs(device, dtype, seed)
        img_lens = make_region_lens(img.shape[0], img.shape[1], seed).to(device)
        img[real_words(img_lens, img.shape[1]).logical_not()] = float("nan")  # image padding too
        low = dtype not in (torch.float32, torch.float64)
        checks = []

        def reference(a, c, settings):
            return max_similarity_reference(a, c, lens.cpu(), img_lens.cpu(), **settings)

        def cpu(x, precision):
            return x.detach().to("cpu", precision)

        for pool, leaky in option_sets:
            settings = dict(direction=direction, pool=pool, tau=MAXSIM_TAU, leaky=leaky,
                            both_scale=MAXSIM_BOTH_SCALE, **coding_settings)
            ref64 = reference(cpu(img, torch.float64), cpu(cap, torch.float64), settings)
            lowp = reference(cpu(img, dtype), cpu(cap, dtype), settings).float() if low else None
            poison_allocator(device)
            out = rcar_fast.max_similarity(img, cap, lens, img_lens=img_lens, backend=backend, **settings)
            measure(checks, f"forward {pool}{'/leaky' if leaky else ''}", out.cpu(), ref64, dtype, lowp)
        measure(checks, f"poisoned output {pool}", maxsim_poisoned(backend, img, cap, lens, img_lens, settings).cpu(),
                ref64, dtype, lowp)
        # Gradients (lse with leaky: every coefficient non-zero, the slope exercised) against
        # autograd through the float64 reference, same weights; exactly zero in all padding.
        settings = dict(direction=direction, pool="lse", tau=MAXSIM_TAU, leaky=not vsa, both_scale=MAXSIM_BOTH_SCALE,
                        **coding_settings)
        weights = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + 1))
        poison_allocator(device)
        dimg, dcap = gradients(lambda a, c: rcar_fast.max_similarity(a, c, lens, img_lens=img_lens,
                                                                     backend=backend, **settings),
                               img, cap, weights.to(device))
        rimg, rcap = gradients(lambda a, c: reference(a, c, settings), cpu(img, torch.float64),
                               cpu(cap, torch.float64), weights)
        limg = lcap = None
        if low:
            limg, lcap = gradients(lambda a, c: reference(a, c, settings), cpu(img, dtype), cpu(cap, dtype), weights)
        dimg, dcap = dimg.cpu(), dcap.cpu()
        regions, words = real_words(img_lens.cpu(), img.shape[1]), real_words(lens.cpu(), cap.shape[1])
        measure(checks, "d img (real regions)", dimg[regions], rimg[regions], dtype,
                None if limg is None else limg[regions])
        measure(checks, "d cap (real words)", dcap[words], rcap[words], dtype, None if lcap is None else lcap[words])
        measure_zero(checks, "d img (padding)", dimg[~regions].float())
        measure_zero(checks, "d cap (padding)", dcap[~words].float())
        return checks

    return Case(f"maxsim/{backend}/{direction}{'/vsa' if vsa else ''}/{dtype_name}", backend, run)


def all_cases(seed):
    """In priority order, for a budget that runs out: bf16 and fp32 (what is benchmarked) before
    fp16, each op on both backends before the next dtype."""
    cases = []
    for dtype_name in ("bf16", "fp32", "fp16"):
        for backend in ("triton", "cuda"):
            for direction in ("t2i", "i2t"):
                cases.append(scan_case(backend, direction, dtype_name, seed))
        for backend in ("triton", "cuda"):
            for regulator, steps, direction, dtype, with_grads in RCAR_CASES:
                if dtype == dtype_name:
                    cases.append(rcar_case(backend, regulator, steps, direction, dtype, with_grads, seed))
        for backend in ("triton", "cuda"):
            for direction in contract.HEAD_DIRECTIONS:
                cases.append(maxsim_case(backend, direction, dtype_name, seed))
        cases.append(maxsim_case("cuda", "i2t", dtype_name, seed, coding="vsa"))
    return cases


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------

def run_case(case):
    start = time.perf_counter()
    checks, reason = [], ""
    try:
        checks = case.run()
        if HAS_GPU:
            torch.cuda.synchronize()  # an asynchronous kernel fault belongs to this case
        status = "PASS" if all(c["ok"] for c in checks) else "FAIL"
    except Skip as skip:
        status, reason = "SKIP", str(skip)
    except Exception as err:  # reported as the case's failure; the pass goes on
        status, reason = "FAIL", f"error: {type(err).__name__}: {err}"[:800]
    return dict(name=case.name, backend=case.backend, status=status, reason=reason, checks=checks,
                seconds=round(time.perf_counter() - start, 3))


def describe(result):
    if result["reason"]:
        return result["reason"]
    failed = [c for c in result["checks"] if not c["ok"]]
    shown = failed or [max(result["checks"], key=lambda c: c["err"] / c["bound"] if c["bound"] else c["err"])]
    return "; ".join(f"{c['what']}: err {c['err']:.2e} {'<=' if c['ok'] else '>'} bound {c['bound']:.2e}"
                     for c in shown) + f" ({len(result['checks'])} checks)"


def write_outputs(out_dir, results, facts):
    """correctness.json and correctness.csv, each replaced whole (a kill mid-write leaves the
    previous version, never half a file)."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    _write_json(os.path.join(out_dir, "correctness.json"), dict(facts=facts, counts=counts, cases=results))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["case", "backend", "status", "check", "max_abs_error", "bound", "ok", "seconds", "reason"])
    for r in results:
        for c in r["checks"] or [dict(what="", err="", bound="", ok="")]:
            writer.writerow([r["name"], r["backend"], r["status"], c["what"], c["err"], c["bound"], c["ok"],
                             r["seconds"], r["reason"]])
    path = os.path.join(out_dir, "correctness.csv")
    with open(path + ".partial", "w", newline="") as f:
        f.write(rows.getvalue())
    os.replace(path + ".partial", path)
    return counts


def main():
    facts = dict(dry_run=ARGS.dry_run, seed=ARGS.seed, gpu=torch.cuda.get_device_name() if HAS_GPU else None,
                 torch=torch.__version__, triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
                 autotune=os.environ.get("RCAR_FAST_AUTOTUNE", ""), sizes=SIZES)
    print(f"[correctness] {'dry run (CPU, interpreter)' if ARGS.dry_run else facts['gpu'] or 'no GPU'}; "
          f"seed {ARGS.seed}; sizes {SIZES}", flush=True)
    results, start, out_of_time = [], time.perf_counter(), 0
    for case in all_cases(ARGS.seed):
        if ARGS.keyword not in case.name:
            continue
        if ARGS.budget_s is not None and time.perf_counter() - start > ARGS.budget_s:
            out_of_time += 1
            result = dict(name=case.name, backend=case.backend, status="SKIP", checks=[], seconds=0.0,
                          reason=f"skipped: out of time (--budget-s {ARGS.budget_s:g})")
        else:
            result = run_case(case)
        results.append(result)
        print(f"{result['status']}  {case.name:<34} {result['seconds']:6.1f}s  {describe(result)}", flush=True)
        write_outputs(ARGS.out, results, facts)  # after every case: a hang later keeps these
    counts = write_outputs(ARGS.out, results, facts)
    print(f"[correctness] {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
          f"{f' ({out_of_time} out of time)' if out_of_time else ''}; {os.path.join(ARGS.out, 'correctness.json')}")
    if counts["FAIL"] or not counts["PASS"]:
        return 1
    return 3 if out_of_time else 0


if __name__ == "__main__":
    sys.exit(main())
