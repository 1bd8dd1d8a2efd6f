"""The ``rcar-fast`` command (also ``python -m rcar_fast``).

    rcar-fast demo [--size NAME] [--backend B] [--json out.json]
        all-pairs SCAN t2i similarity on the synthetic COCO-shaped set, checked against the
        vectorised reference on a slice, with timing, pairs/s and a recall table.
    rcar-fast eval --checkpoint model_best.pth --data DIR [--split testall] [--protocol P]
                   [--ensemble other.pth results.npy ...] [--backend B]
                   [--save sims.npy [--save-format public]] [--json out.json]
        encode a precomputed split with an official RCAR checkpoint and evaluate retrieval;
        the protocol is chosen from the split's size unless --protocol names one.
    rcar-fast eval --embeddings DIR [DIR ...] [--head NAME] [--checkpoint model_best.pth]
                   [--ensemble ...]
        evaluate already-encoded embeddings: with a head of the registry (rcar_fast.scorers:
        --head scan (default, SCAN t2i) or another head without weights or a preset), or
        the checkpoints' heads.
    rcar-fast ensemble a.npy b.npy [...] [--protocol P] [--save ...] [--json ...]
        average saved similarity matrices (bare, or the public {'npts', 'sims'} results)
        and evaluate the ensemble, as the public eval_ensemble does.
    rcar-fast attention --embeddings DIR --pairs 0:0,0:1 --out DIR [--head H | --checkpoint C]
                        [--captions caps.txt] [--image im.jpg --boxes boxes.npy [--word W]]
        one PNG per pair: the word x region attention heat map, with the overlay on the image
        when an image and its region boxes are given (rcar_fast.attention).
    rcar-fast bench ...
        the benchmarks (bench/), when present.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import warnings
from typing import Optional

import torch

from rcar_fast import data, dispatch, evaluation, metrics, scorers
from rcar_fast.atomic import atomic_path, check_output_path

__all__ = ["main", "build_parser"]

SIZES = ("auto",) + tuple(data.SYNTHETIC_SIZES)
# Pairs the vectorised reference scores for the demo's cross-check (about 10 s on 2 CPU cores).
DEMO_REFERENCE_PAIRS = 20_000
DEMO_JSON = os.path.join("out", "demo_results.json")
# Errors that are the user's input (files, arguments, data), reported in one line (exit 2).
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, else one line naming what was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcar-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{demo,eval,ensemble,attention,bench}")
    sub.required = True

    demo = sub.add_parser("demo", help="all-pairs SCAN retrieval on the synthetic set")
    demo.add_argument("--size", default="auto", choices=SIZES,
                      help="synthetic set size (images, d): " + ", ".join(
                          f"{k}={v[0]}x{v[1]}" for k, v in data.SYNTHETIC_SIZES.items())
                      + "; auto: 'coco5k' on a GPU, 'demo' with fused CPU kernels, 'small' "
                        "with the reference only")
    demo.add_argument("--images", type=_positive_int, default=None,
                      help="override the number of images")
    demo.add_argument("--dim", type=_positive_int, default=None, help="override the feature size d")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    demo.add_argument("--reference-pairs", type=_non_negative_int, default=DEMO_REFERENCE_PAIRS,
                      help="pairs on which the vectorised reference cross-checks the backend "
                           "(0: skip)")
    _common_compute_args(demo)
    demo.add_argument("--json", default=DEMO_JSON,
                      help=f"where to write the results (default: {DEMO_JSON})")

    ev = sub.add_parser("eval", help="evaluate retrieval with official RCAR / SCAN checkpoints")
    ev.add_argument("--checkpoint", help="official RCAR model_best.pth or SCAN model_best.pth.tar")
    ev.add_argument("--ensemble", nargs="+", default=[], metavar="PATH",
                    help="more checkpoints (each scores the split with its own encoders, or "
                         "the matching --embeddings folder) and/or saved results (.npy: a "
                         "matrix or the public {'npts', 'sims'}), averaged with the first")
    ev.add_argument("--data", help="folder with {split}_ims.npy and {split}_caps.txt "
                                   "(or a precomp/ subfolder)")
    ev.add_argument("--split", default="testall",
                    help="split name (default testall); 'dev' is cut to its first 5000 "
                         "captions, as the public loaders do")
    ev.add_argument("--vocab", help="vocabulary json (default: found next to --data)")
    ev.add_argument("--embeddings", nargs="+", metavar="DIR",
                    help="folder(s) with img_embs, cap_embs, cap_lens (.npy/.pt) instead of "
                         "--data: one for all models, or one per checkpoint (--checkpoint "
                         "first, then the --ensemble checkpoints)")
    ev.add_argument("--head", default=None,
                    help="the head scoring --embeddings without --checkpoint: one of "
                         + ", ".join(scorers.names(keyword_only=True)) + " (default scan: SCAN t2i)")
    _protocol_args(ev)
    ev.add_argument("--batch-size", type=_positive_int, default=128, help="encoder batch size")
    ev.add_argument("--trust-checkpoint", action="store_true",
                    help="load checkpoints with arbitrary pickled objects (trusted files only)")
    ev.add_argument("--allow-unsplit-sentences", action="store_true",
                    help="without nltk's punkt data, tokenise captions that may hold two "
                         "sentences as one (warned about and counted in the results json) "
                         "instead of refusing")
    _output_args(ev)
    _common_compute_args(ev)

    ens = sub.add_parser("ensemble", help="evaluate the average of saved similarity matrices")
    ens.add_argument("results", nargs="+", metavar="RESULTS.npy",
                     help="saved matrices: rcar-fast eval --save output (either format) or "
                          "the public results_{data_name}.npy")
    _protocol_args(ens)
    _output_args(ens)
    ens.add_argument("--debug", action="store_true",
                     help="show the full error and traceback instead of one line")

    _attention_parser(sub)

    bench = sub.add_parser("bench", help="run the benchmarks (bench/)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _attention_parser(sub):
    from rcar_fast.contract import (DIRECTIONS, HEAD_CODINGS, HEAD_NORMALIZATIONS, HEAD_PRESETS,
                                    RAW_NORMS)

    head_names = ("scan", "maxsim") + tuple(HEAD_PRESETS)    # rcar_fast.attention.HEAD_NAMES

    att = sub.add_parser("attention", help="attention maps of chosen pairs, one PNG per pair")
    att.add_argument("--embeddings", required=True, metavar="DIR",
                     help="folder with img_embs, cap_embs, cap_lens (.npy/.pt), as eval reads")
    att.add_argument("--pairs", required=True, help="image:caption index pairs, e.g. 0:0,0:1,3:15")
    att.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created)")
    att.add_argument("--head", choices=head_names,
                     help="scan (default): SCAN's softmax; maxsim or a preset: the S-only "
                          "heads' argmax one-hot")
    att.add_argument("--checkpoint", help="an official RCAR (its head's last step) or SCAN "
                                          "checkpoint instead of --head")
    att.add_argument("--trust-checkpoint", action="store_true",
                     help="load a checkpoint with arbitrary pickled objects (trusted files only)")
    att.add_argument("--direction", choices=DIRECTIONS,
                     help="the map's direction (default: the head's; both for laps)")
    att.add_argument("--smooth", type=float, help="SCAN's softmax temperature (default 9)")
    att.add_argument("--raw-norm", choices=RAW_NORMS, help="SCAN's raw-score normalisation")
    att.add_argument("--normalize", choices=HEAD_NORMALIZATIONS, help="maxsim: input normalisation")
    att.add_argument("--coding", choices=HEAD_CODINGS, help="maxsim: max, or CHAN's vsa (i2t)")
    att.add_argument("--captions", help="caption text, one a line ({split}_caps.txt): the "
                                        "word labels (default: word positions)")
    att.add_argument("--vocab", help="with --captions: its lines are word ids, named by this "
                                     "vocabulary json")
    att.add_argument("--image", help="the image file of the overlay ({img} in the path: the "
                                     "pair's image index)")
    att.add_argument("--boxes", help=".npy of the region boxes, BUTD x1 y1 x2 y2 in pixels: "
                                     "(R, 4), (n_img, R, 4) or one row per caption (the public "
                                     "test_ims_bbx.npy); {img} as for --image")
    att.add_argument("--word", help="overlay this word only (its index or text; default each)")
    att.add_argument("--cmap", default="jet", help="matplotlib colormap (default jet)")
    att.add_argument("--dpi", type=_positive_int, default=100)
    att.add_argument("--save-weights", action="store_true",
                     help="also write each map as .npy (L, R) next to its PNG")
    att.add_argument("--debug", action="store_true",
                     help="show the full error and traceback instead of one line")


def _protocol_args(p):
    p.add_argument("--protocol", choices=tuple(evaluation.PROTOCOLS),
                   help="default: chosen from the size (5000 images: coco5k and its 1K folds; "
                        "1000: f30k; any other size: all images)")
    p.add_argument("--any-size", action="store_true",
                   help="let a named --protocol evaluate a split that is not its size")


def _common_compute_args(p):
    p.add_argument("--backend", default="auto", choices=dispatch.REQUESTABLE)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--img-block", type=_positive_int, default=None,
                   help="images per similarity call")
    p.add_argument("--cap-block", type=_positive_int, default=None,
                   help="captions per similarity call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true",
                   help="show the full error and traceback instead of one line")


def _output_args(p):
    p.add_argument("--save", help="write the similarity matrix (the ensemble's, with "
                                  "--ensemble) to this .npy file")
    p.add_argument("--save-format", choices=evaluation.RESULT_FORMATS, default="matrix",
                   help="matrix: the bare (n_img, n_cap) array; public: the {'npts', 'sims'} "
                        "dict the public RCAR evalrank writes and eval_ensemble reads")
    p.add_argument("--json", help="write the results to this json file")


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "ensemble":
            return _ensemble_command(args)
        if args.command == "attention":
            from rcar_fast.attention import run_command

            return run_command(args)
        return _eval(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"rcar-fast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"rcar-fast {args.command}: interrupted (no partial output files were left)",
              file=sys.stderr)
        return 130
    finally:
        _teardown_distributed()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    more = " (more with --debug)" if len(lines) > 1 else ""
    return lines[0] + more


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def _bench(argv) -> int:
    try:
        from bench.__main__ import main as bench_main
    except ImportError as err:
        print(f"rcar-fast bench: the benchmarks are not available here ({err}); run from a "
              "source checkout, where bench/ sits next to rcar_fast/", file=sys.stderr)
        return 2
    return int(bench_main(argv) or 0)


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------

def _resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return dispatch.choose(op, backend, device, dtype).backend


_JOINED_PROCESS_GROUP = []


def _teardown_distributed():
    import torch.distributed as dist

    if _JOINED_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _JOINED_PROCESS_GROUP.clear()


def _setup_device(args) -> tuple:
    """(device, rank). Under torchrun (WORLD_SIZE > 1) joins the process group (NCCL on GPUs,
    gloo on CPU), so that evaluation shards the image blocks over the ranks; only rank 0
    prints, computes metrics and writes files."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device is not None:
        evaluation.resolve_device(args.device)      # a clear error before anything starts
    wants_gpu = args.device is None and torch.cuda.is_available() or \
        (args.device or "").startswith("cuda")
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if wants_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if wants_gpu else "gloo")
        _JOINED_PROCESS_GROUP.append(True)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if wants_gpu and (world > 1 or args.device is None):
        device = torch.device("cuda", torch.cuda.current_device())   # LOCAL_RANK's GPU
    else:
        device = torch.device(args.device or "cpu")
    if rank != 0:
        args.no_progress = True
    return evaluation.resolve_device(device), rank


def _demo(args) -> int:
    if args.json == DEMO_JSON:
        os.makedirs(os.path.dirname(DEMO_JSON), exist_ok=True)
    check_output_path(args.json, "--json")
    device, rank = _setup_device(args)
    dtype = getattr(torch, args.dtype)
    backend = _resolve_backend("scan", args.backend, device, dtype)
    size = args.size
    if size == "auto":
        if backend in ("reference", "reference_loop"):
            size = "small"          # the reference alone: about a minute on 2 CPU cores
        else:
            size = "coco5k" if device.type == "cuda" else "demo"
    n_images, dim = data.synthetic_size(size)
    n_images = args.images if args.images is not None else n_images
    dim = args.dim if args.dim is not None else dim
    if rank == 0:
        print(f"rcar-fast demo: synthetic set '{size}' ({n_images} images x 36 regions, "
              f"{5 * n_images} captions, d={dim}, {args.dtype}); SCAN t2i on backend "
              f"{backend!r} ({device.type})")

    timing = {}
    t0 = time.perf_counter()
    ds = data.synthetic(n_images=n_images, dim=dim, seed=args.seed, dtype=dtype)
    timing["generate_s"] = time.perf_counter() - t0

    stats = {}
    sims = evaluation.all_pairs(ds.img, ds.cap, ds.lens, evaluation.scan_fn(backend),
                                img_block=args.img_block, cap_block=args.cap_block,
                                device=device, progress=not args.no_progress, stats=stats)
    if rank != 0:
        return 0             # this rank's shard went to rank 0
    timing["similarity_s"] = stats["seconds"]
    pairs_per_s = stats["pairs"] / stats["seconds"]   # all ranks together

    t0 = time.perf_counter()
    rows = {f"SCAN t2i [{backend}]": metrics.recall_metrics(sims)}
    if n_images % 1000 == 0 and n_images >= 2000:
        rows["1K folds (mean)"] = metrics.coco1k_metrics(sims)
    timing["metrics_s"] = time.perf_counter() - t0

    check = _reference_check(ds, sims, backend, device, args.reference_pairs)
    _print_demo(ds, rows, timing, pairs_per_s, check)
    result = {
        "command": "demo", "size": size, "n_images": n_images, "n_captions": int(ds.cap.shape[0]),
        "regions": int(ds.img.shape[1]), "dim": dim, "dtype": args.dtype,
        "max_words": int(ds.cap.shape[1]), "mean_words": float(ds.lens.float().mean()),
        "backend": backend, "device": _device_name(device), "timing": timing,
        "pairs_per_s": pairs_per_s, "metrics": rows, "reference_check": check,
    }
    _write_json(args.json, result)
    print(f"results written to {args.json}")
    return 0 if check.get("ok", True) else 1


def _reference_check(ds, sims, backend, device, budget) -> dict:
    """The backend's matrix vs the vectorised reference on the first images x captions that
    fit ``budget`` pairs; times the reference there for a speed comparison."""
    if budget <= 0 or backend == "reference":
        return {"skipped": "reference backend" if backend == "reference" else "disabled"}
    from rcar_fast.reference_math import scan_similarity_vectorized

    n_img = max(1, min(ds.img.shape[0], int((budget / 5) ** 0.5)))
    n_cap = max(1, min(ds.cap.shape[0], budget // n_img))
    img = ds.img[:n_img].to(device, torch.float32)
    cap = ds.cap[:n_cap].to(device, torch.float32)
    t0 = time.perf_counter()
    ref = scan_similarity_vectorized(img, cap, ds.lens[:n_cap].to(device)).float().cpu()
    seconds = time.perf_counter() - t0
    got = torch.as_tensor(sims[:n_img, :n_cap]).float()
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max()) or 1.0
    tolerance = 1e-4 if ds.img.dtype == torch.float32 else 2e-2
    return {"pairs": n_img * n_cap, "max_abs_diff": err, "max_rel_diff": err / scale,
            "reference_pairs_per_s": n_img * n_cap / seconds, "ok": err / scale < tolerance}


def _print_demo(ds, rows, timing, pairs_per_s, check):
    n_pairs = ds.img.shape[0] * ds.cap.shape[0]
    print(f"\n  generate   {timing['generate_s']:8.2f} s")
    print(f"  similarity {timing['similarity_s']:8.2f} s   {n_pairs:,} pairs, "
          f"{pairs_per_s:,.0f} pairs/s")
    print(f"  metrics    {timing['metrics_s']:8.2f} s")
    if "pairs" in check:
        speedup = pairs_per_s / check["reference_pairs_per_s"]
        print(f"  reference  {check['reference_pairs_per_s']:,.0f} pairs/s on {check['pairs']:,} "
              f"pairs -> {speedup:.1f}x; max |diff| {check['max_abs_diff']:.2e} "
              f"({'ok' if check['ok'] else 'MISMATCH'})")
    print()
    print(metrics.format_metrics_table(rows))
    print()


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

def _eval(args) -> int:
    if args.embeddings is None and (args.checkpoint is None or args.data is None):
        raise ValueError("eval needs --checkpoint and --data, or --embeddings "
                         "(optionally with --checkpoint for its RCAR head)")
    if args.embeddings is not None and args.data is not None:
        raise ValueError("give either --data (features to encode) or --embeddings (already "
                         "encoded), not both")
    _check_outputs(args)
    checkpoints, saved = _split_ensemble(args)
    _check_head(args, checkpoints)
    embeddings = _match_embeddings(args.embeddings, checkpoints)
    device, rank = _setup_device(args)
    timing, described = {}, []
    # Saved results are read (memory-mapped) and checked before any computation.
    saved_results = {path: evaluation.load_results(path) for path in saved}

    split, tokens, tokenizer = None, None, None
    if args.embeddings is None:
        t0 = time.perf_counter()
        split = data.load_precomp(args.data, args.split)
        if split.note and rank == 0:
            print(f"rcar-fast eval: {split.note}")
        # Tokenised once, before any model is loaded: a caption that cannot be tokenised
        # as the public code does stops the run here.
        tokenizer = data.Tokenizer(allow_unsplit=args.allow_unsplit_sentences)
        tokens = _CaptionTokens(split.captions, tokenizer)
        timing["load_s"] = time.perf_counter() - t0

    named = {}  # row name -> similarity matrix
    # No checkpoint: the --head (SCAN t2i by default) on each embeddings folder.
    models = checkpoints or [None] * len(embeddings or [None])
    for index, (path, folder) in enumerate(zip(models, embeddings or [None] * len(models))):
        label = "model" if index == 0 else f"ensemble{index}"
        sims, info = _score_one(args, path, split, tokens, folder, device, timing, label)
        described.append(info)
        named[_unique(named, info["name"])] = sims
    if rank != 0:
        return 0             # this rank's shards went to rank 0
    for path, sims in saved_results.items():
        name = _unique(named, f"saved ({os.path.basename(path)})")
        named[name] = sims
        described.append({"name": name, "results": path})
    _check_same_shape(named)
    extra = {"models": described}
    if tokenizer is not None:
        extra["tokenizer"] = tokenizer.describe()
        if tokenizer.unsplit:
            print(f"rcar-fast eval: WARNING: {len(tokenizer.unsplit)} captions were tokenised "
                  f"as one sentence without nltk's punkt data; the metrics may differ from the "
                  f"public evaluation (recorded in the results)", file=sys.stderr)
    return _report(args, named, timing, device, "eval", extra)


class _CaptionTokens:
    """The split's tokens, per lower-casing rule: RCAR lower-cases Unicode, SCAN's Python 2
    loader ASCII only; the two differ only for captions with non-ASCII letters."""

    def __init__(self, captions, tokenizer):
        self.captions, self.tokenizer = captions, tokenizer
        self.by_rule = {"unicode": self._tokenize(tokenizer)}

    def _tokenize(self, tokenizer):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            tokens = [tokenizer(c) for c in self.captions]
        for warning in caught[:1]:
            print(f"rcar-fast eval: WARNING: {warning.message}", file=sys.stderr)
        return tokens

    def get(self, lowercase: str):
        if lowercase not in self.by_rule:
            if all(c.isascii() for c in self.captions):
                self.by_rule[lowercase] = self.by_rule["unicode"]
            else:
                self.by_rule[lowercase] = self._tokenize(data.Tokenizer(
                    allow_unsplit=self.tokenizer.allow_unsplit, lowercase=lowercase))
        return self.by_rule[lowercase]


def _ensemble_command(args) -> int:
    if len(args.results) < 2:
        raise ValueError("ensemble needs at least two results files")
    _check_outputs(args)
    named = {}
    for path in args.results:
        named[_unique(named, os.path.basename(path))] = evaluation.load_results(path)
    _check_same_shape(named)
    return _report(args, named, {}, None, "ensemble",
                   {"models": [{"name": name, "results": path}
                               for name, path in zip(named, args.results)]})


def _report(args, named, timing, device, command, extra) -> int:
    """Adds the ensemble row, computes the metrics of every protocol, prints, saves."""
    final = next(iter(named.values()))
    if len(named) > 1:
        # float64, as the public eval_ensemble averages: no ties made by rounding.
        final = metrics.ensemble(*named.values(), dtype=torch.float64)
        named["ensemble (ALL)"] = final
    n_img = final.shape[0]
    protocols, chosen = ([args.protocol], "given") if args.protocol else \
        (evaluation.protocols_for_size(n_img), "chosen from the size")
    rows, public = {}, {}
    for protocol in protocols:
        for name, sims in named.items():
            row = name if protocol == protocols[0] else f"{name} / {protocol}"
            with_folds = sims is final and protocol == "coco1k"   # folds for the public lines
            rows[row] = _protocol_metrics(sims, protocol, args.any_size, timing, protocol,
                                          return_folds=with_folds)
            if with_folds:
                rows[row], folds = rows[row]
                public[protocol] = (rows[row], folds)
            elif sims is final:
                public[protocol] = (rows[row], None)
    protocol = "+".join(protocols)
    if args.save:
        evaluation.save_results(args.save, final, args.save_format)
    print()
    print(f"protocol {protocol} ({chosen}), {n_img} images, {final.shape[1]} captions")
    print(metrics.format_metrics_table(rows))
    for protocol in protocols:
        print(f"\n{list(named)[-1]} ({protocol}), as the public evaluation prints it:")
        print(_public_lines(*public[protocol]))
    if timing:
        print("\n" + "  ".join(f"{k} {v:.2f}s" for k, v in timing.items()))
    if args.save:
        print(f"similarity matrix written to {args.save} ({args.save_format} format)")
    if args.json:
        result = {"command": command, "protocol": protocol, "protocol_choice": chosen,
                  "n_images": n_img, **extra, "metrics": rows, "timing": timing,
                  "saved": args.save, "save_format": args.save_format if args.save else None}
        if device is not None:
            result["device"] = _device_name(device)
        _write_json(args.json, result)
    return 0


def _public_lines(result, folds=None) -> str:
    """What the public evalrank / eval_ensemble log: fold5=False for one matrix, fold5=True
    (each fold, then the mean ``result``) for the 1K protocol."""
    lines = []
    for fold in folds or ():
        r = tuple(fold[f"i2t_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
        ri = tuple(fold[f"t2i_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
        lines += ["Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % r,
                  "Text to image: %.1f, %.1f, %.1f, %.1f, %.1f" % ri,
                  "rsum: %.1f ar: %.1f ari: %.1f" % (fold["rsum"], sum(r[:3]) / 3, sum(ri[:3]) / 3)]
    if folds:
        lines += ["-----------------------------------", "Mean metrics: "]
    return "\n".join(lines + [metrics.public_report(result)])


def _check_outputs(args):
    """--save / --json must be writable files: refused before any computation."""
    for flag, path in (("--save", args.save), ("--json", args.json)):
        if path is not None:
            check_output_path(path, flag)
    if args.save and args.json and os.path.abspath(args.save) == os.path.abspath(args.json):
        raise ValueError("--save and --json name the same file")


def _check_head(args, checkpoints):
    """--head names the head of embeddings scored without a checkpoint (one with weights
    comes with its checkpoint)."""
    if args.head is None:
        return
    if checkpoints:
        raise ValueError("--head scores --embeddings without --checkpoint; a checkpoint "
                         "brings its own head")
    if args.embeddings is None:
        raise ValueError("--head needs --embeddings (with --data, the checkpoint's head scores)")
    allowed = scorers.names(keyword_only=True)
    if args.head not in allowed:
        why = " (a head with weights: give its --checkpoint)" if args.head in scorers.names() else ""
        raise ValueError(f"--head must be one of {', '.join(allowed)}, got {args.head!r}{why}")


def _split_ensemble(args):
    """(checkpoints in order: --checkpoint then --ensemble ones, saved results files)."""
    checkpoints = [args.checkpoint] if args.checkpoint else []
    saved = []
    for path in args.ensemble:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ensemble {path}: file not found")
        (saved if path.endswith(".npy") else checkpoints).append(path)
    if args.ensemble and not args.checkpoint and args.embeddings is None:
        raise ValueError("--ensemble needs --checkpoint (the first model)")
    return checkpoints, saved


def _match_embeddings(folders, checkpoints):
    """One embeddings folder per model; a single folder serves every model."""
    if folders is None:
        return None
    if len(folders) == 1:
        return folders * max(len(checkpoints), 1)
    if checkpoints and len(folders) != len(checkpoints):
        raise ValueError(f"--embeddings gives {len(folders)} folders for {len(checkpoints)} "
                         f"checkpoints; give one folder, or one per checkpoint (--checkpoint "
                         f"first, then the --ensemble checkpoints)")
    return folders


def _unique(named, name):
    candidate, n = name, 2
    while candidate in named:
        candidate, n = f"{name} #{n}", n + 1
    return candidate


def _check_same_shape(named):
    shapes = {name: tuple(m.shape) for name, m in named.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the ensemble's similarity matrices differ in shape: {shapes}")


def _score_one(args, checkpoint_path, split, tokens, embeddings_dir, device, timing, label):
    """(similarity matrix, description) of one model on the split."""
    from rcar_fast.checkpoint import load_checkpoint

    model = None
    if checkpoint_path is not None:
        t0 = time.perf_counter()
        model = load_checkpoint(checkpoint_path, map_location=device,
                                trusted=args.trust_checkpoint)
        timing[f"{label}_load_checkpoint_s"] = time.perf_counter() - t0
    if split is not None:
        vocab = data.load_vocab(args.vocab or _find_vocab(args.data, model.opt))
        t0 = time.perf_counter()
        img = model.encode_images(split.images, args.batch_size, device)
        words = tokens.get("ascii" if model.kind == "scan" else "unicode")
        cap, lens = model.encode_captions([vocab.encode_tokens(t) for t in words],
                                          args.batch_size, device)
        timing[f"{label}_encode_s"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        img, cap, lens = data.load_embeddings(embeddings_dir)
        timing[f"{label}_load_embeddings_s"] = time.perf_counter() - t0

    # The head: the checkpoint's (its module), else --head's (a name of the registry).
    head_model = model.sim_enc if model is not None else (args.head or "scan")
    head = scorers.scoring(head_model)
    similarity = evaluation.head_fn(head_model, args.backend)
    name = head.label()
    if model is not None:
        name += f" ({os.path.basename(checkpoint_path)})"
    elif len(args.embeddings) > 1:
        name += f" ({os.path.basename(os.path.normpath(embeddings_dir))})"
    cap_dtype = metrics._torch_dtype(cap)
    backend = _resolve_backend(head.scorer.all_pairs_op, args.backend, device, cap_dtype)
    stats = {}
    sims = evaluation.all_pairs(img, cap, lens, similarity, img_block=args.img_block,
                                cap_block=args.cap_block, device=device,
                                progress=not args.no_progress, stats=stats,
                                desc=f"{label} similarity")
    timing[f"{label}_similarity_s"] = stats["seconds"]
    info = {"name": f"{name} [{backend}]", "checkpoint": checkpoint_path, "backend": backend,
            "pairs": stats["pairs"], "pairs_per_s": stats["pairs"] / stats["seconds"],
            "ranks": stats["world"]}
    if embeddings_dir is not None:
        info["embeddings"] = embeddings_dir
    if model is not None:
        info["epoch"] = model.epoch
    return sims, info


def _protocol_metrics(sims, protocol, any_size, timing, label, return_folds=False):
    t0 = time.perf_counter()
    out = evaluation.evaluate_protocol(sims, protocol, strict=not any_size,
                                       return_folds=return_folds)
    timing[f"{label}_metrics_s"] = timing.get(f"{label}_metrics_s", 0.0) + time.perf_counter() - t0
    return out


def _find_vocab(data_dir, opt) -> str:
    data_name = str((opt or {}).get("data_name", ""))
    names = ["coco_precomp_vocab.json" if "coco" in data_name else "f30k_precomp_vocab.json"]
    names += [f"{data_name}_vocab.json"] if data_name else []
    data_dir = os.path.abspath(data_dir)
    folders = [data_dir, os.path.join(data_dir, "vocab"), os.path.dirname(data_dir),
               os.path.join(os.path.dirname(data_dir), "vocab")]
    vocab_path = (opt or {}).get("vocab_path")
    if vocab_path:
        folders.insert(0, vocab_path)
    for folder in folders:
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
    raise FileNotFoundError(f"no vocabulary file ({' or '.join(names)}) in {folders}; "
                            "pass --vocab")


def _write_json(path, content):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, default=str)
            f.write("\n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    raise SystemExit(main())
