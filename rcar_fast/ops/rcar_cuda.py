"""RCAR similarity head on the CUDA C++ kernel (csrc/cuda/rcar.cu): eval-mode forward only.

The kernel is plain SIMT (correctness first): a persistent grid of blocks, each scoring one
(image, caption) pair at a time, its (Q, d) intermediates in a per-block workspace slot that is
reused pair after pair (memory O(blocks x Q x d), never O(pairs x Q x d)). Features are cast to
float32, weights are passed as float32 (in, out) matrices through a device table of pointers
whose order is fixed in csrc/cuda/kernels.h (`weight_tensors` below builds it).

The result carries no gradient: dispatch refuses it for a training step and for active dropout.

Not in backend="auto"'s order (RcarCuda.not_in_auto, shown by rcar_fast.backends() and in
dispatch's errors): every FLOP is a CUDA-core FP32 FMA (the compiled kernel has no tensor-core
instruction) and a block scores one pair at a time, an estimated ~5 minutes for COCO 5K t2i
against 15-30 s for the Triton kernel (issue 15). backend="cuda" still runs it.
"""
from __future__ import annotations

import torch

from rcar_fast import contract
from rcar_fast.ops.backend import Backend, native
from rcar_fast.ops.library import define_rcar_op
from rcar_fast.ops.rcar_reference import compiled_call, with_weights

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS_PER_SM = 2  # the kernel is built for two resident 256-thread blocks per SM


def _native():
    return native()


def _matrix(linear: torch.nn.Linear) -> torch.Tensor:
    """The Linear's weight as a float32 (in, out) matrix: a thread per output reads it coalesced."""
    return linear.weight.detach().to(torch.float32).t().contiguous()


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).reshape(-1).contiguous()


def weight_tensors(head) -> list[torch.Tensor]:
    """float32 weights in the order of the kernel's pointer table (csrc/cuda/kernels.h)."""
    # A Linear with one output passes its weight as a vector, the others as (in, out) matrices.
    return [t for _, lin, to_one in contract.rcar_linears(head)
            for t in ((_vector(lin.weight) if to_one else _matrix(lin)), _vector(lin.bias))]


def _persistent_blocks(device: torch.device, pairs: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pairs, sms * BLOCKS_PER_SM))


def _features(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x if x.stride(2) == 1 else x.contiguous()


def problem_dict(head, img, cap, lens, max_len, table, workspace, blocks) -> dict:
    """The RcarProblem fields (csrc/cuda/kernels.h) as a dict of ints and floats."""
    n_img, R, d = img.shape
    return dict(
        img=img.data_ptr(), cap=cap.data_ptr(), n_img=n_img, R=R, d=d, n_cap=cap.shape[0],
        img_stride_n=img.stride(0), img_stride_r=img.stride(1),
        cap_stride_n=cap.stride(0), cap_stride_w=cap.stride(1),
        lens=lens.data_ptr(), max_len=max_len, sim_dim=head.sim_dim,
        regulator=contract.REGULATOR_CODES[head.regulator], steps=head.steps,
        i2t=int(head.direction == "i2t"), smooth=float(head.smooth), weights=table.data_ptr(),
        workspace=workspace.data_ptr(), n_blocks=blocks,
    )


def rcar_cuda(head, img, cap, lens) -> torch.Tensor:
    """The registered implementation: inputs validated by RCARSimilarity.forward (lens int64 on
    cap's device). Returns (n_img, n_cap) float32."""
    if head.regulator not in contract.REGULATORS or head.direction not in contract.DIRECTIONS:
        raise ValueError(f"unknown regulator {head.regulator!r} or direction {head.direction!r}")
    native, device = _native(), img.device
    img, cap = _features(img), _features(cap)
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    max_len = int(lens.max())
    n_img, R, d = img.shape
    i2t = head.direction == "i2t"
    tensors = weight_tensors(head)
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
    blocks = _persistent_blocks(device, n_img * cap.shape[0])
    per_block = native.rcar_workspace_floats(R if i2t else max_len, d, head.sim_dim)
    workspace = torch.empty(blocks * per_block, dtype=torch.float32, device=device)
    sims = torch.empty((n_img, cap.shape[0]), dtype=torch.float32, device=device)
    problem = native.RcarProblemCuda(**problem_dict(head, img, cap, lens, max_len, table, workspace, blocks))
    native.rcar_forward_cuda(problem, sims.data_ptr(), torch.cuda.current_stream(device).cuda_stream)
    # `tensors`, `table` and `workspace` are released after the launch: the caching allocator
    # reuses their memory only for work queued later on this stream.
    return sims


def _op_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    return with_weights(config, weights, rcar_cuda, img, cap, lens)


# rcar_fast::rcar_cuda, forward only (no autograd formula): what torch.compile sees.
rcar_cuda_op = define_rcar_op("rcar_cuda", _op_forward)


class RcarCuda(Backend):
    op, backend, kernel = "rcar", "cuda", "the CUDA RCAR kernel"
    dtypes = {"cuda": SUPPORTED_DTYPES}
    has_backward = False
    implements_dropout = False
    not_in_auto = ("plain FP32 FMA, no tensor cores, one pair per block: ~5 min estimated for "
                   "COCO 5K t2i, the Triton RCAR kernel is the faster GPU path")

    @staticmethod
    def fn(head, img, cap, lens):
        if torch.compiler.is_compiling():
            return compiled_call(rcar_cuda_op, head, img.detach(), cap.detach(), lens, detach=True)
        return rcar_cuda(head, img, cap, lens)
