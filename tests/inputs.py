"""The test suite's inputs: random ragged image/caption batches with poisoned caption padding.

Every kernel test draws its (img, cap, lens) here, so that "ragged lengths including 1 and the
longest, NaN (or any poison) in the padding, features of a chosen scale" is written once.
"""
import torch

NAN = float("nan")


def ragged_lengths(n_cap, max_len, *, min_len=1, generator=None):
    """n_cap caption lengths drawn in [min_len, max_len], the first max_len and the last min_len
    (so both ends of the range are always exercised)."""
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=generator)
    lens[0] = max_len
    lens[-1] = min_len
    return lens


def real_words(lens, max_len):
    """(n_cap, max_len) mask, True on the real words of each caption."""
    lens = torch.as_tensor(lens)
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def pad_captions(cap, lens, value):
    """A copy of cap with `value` in every padding position (>= lens[j])."""
    cap = cap.clone()
    cap[~real_words(torch.as_tensor(lens, device=cap.device), cap.shape[1])] = value
    return cap


def make_inputs(n_img, n_cap, R, d, max_len=None, *, lens=None, dtype=torch.float64, device="cpu", pad=NAN,
                seed=None, scale=1.0, unit_norm=False, min_len=1, lens_device=None):
    """img (n_img, R, d), cap (n_cap, max_len, d), lens (n_cap,) int64.

    lens: the given lengths, or drawn by ragged_lengths(n_cap, max_len, min_len) after the
    features; max_len defaults to max(lens). The features are drawn in float64 (from a generator
    seeded with `seed`, or from torch's global generator when seed is None, so the suite's
    per-test seed holds), multiplied by `scale` or l2-normalised per vector (unit_norm), the
    caption padding set to `pad` (None: left as drawn), then cast to dtype and moved to device (lens to lens_device,
    default device)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    if lens is not None:
        lens = torch.as_tensor(lens, dtype=torch.int64).cpu()
        assert lens.shape == (n_cap,), f"{n_cap} captions but lens {tuple(lens.shape)}"
    if max_len is None:
        assert lens is not None, "give lens or max_len"
        max_len = int(lens.max())
    img = torch.randn(n_img, R, d, generator=gen, dtype=torch.float64)
    cap = torch.randn(n_cap, max_len, d, generator=gen, dtype=torch.float64)
    if lens is None:
        lens = ragged_lengths(n_cap, max_len, min_len=min_len, generator=gen)
    if unit_norm:
        img, cap = (torch.nn.functional.normalize(x, dim=-1) for x in (img, cap))
    elif scale != 1.0:
        img, cap = img * scale, cap * scale
    if pad is not None:
        cap = pad_captions(cap, lens, pad)
    return (img.to(device=device, dtype=dtype), cap.to(device=device, dtype=dtype),
            lens.to(lens_device or device))
