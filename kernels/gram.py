"""Per-image Gram matrix G[n] = X[n] X[n]^T in Triton.

SCAN's fused kernels need exactly this for the Gram identity (|ctx|^2 = alpha^T G alpha); it is
also the smallest end-to-end check of the Triton build and dispatch path.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _gram_kernel(x_ptr, out_ptr, R, D, stride_n, stride_r, stride_d,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (image, row tile, column tile); fp32 accumulation over d.
    # The image index is widened to int64 before it meets a stride: program ids and int
    # arguments below 2^31 are int32, and img * stride_n passes 2^31 once n * R * d does
    # (an i2t Gram over > 42K captions at Lmax 50), as does img * R * R for the output.
    img = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    base = x_ptr + img * stride_n
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = tl.load(base + rows[:, None] * stride_r + ks[None, :] * stride_d,
                    mask=(rows[:, None] < R) & (ks[None, :] < D), other=0.0)
        b = tl.load(base + cols[:, None] * stride_r + ks[None, :] * stride_d,
                    mask=(cols[:, None] < R) & (ks[None, :] < D), other=0.0)
        # Cast before the dot: the interpreter multiplies bf16 bit patterns otherwise, and
        # fp32 operands keep the CPU-interpreter results exact enough for the 1e-4 rule.
        acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    out = out_ptr + img * R * R + rows[:, None] * R + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < R) & (cols[None, :] < R))


def gram(x: torch.Tensor) -> torch.Tensor:
    """x (n, R, d) fp16/bf16/fp32 -> (n, R, R) float32."""
    n, R, D = x.shape
    out = torch.empty((n, R, R), device=x.device, dtype=torch.float32)
    block_r = max(16, min(64, triton.next_power_of_2(R)))
    block_d = 32 if x.device.type == "cpu" else 64
    grid = (n, triton.cdiv(R, block_r), triton.cdiv(R, block_r))
    _gram_kernel[grid](x, out, R, D, x.stride(0), x.stride(1), x.stride(2),
                       BLOCK_R=block_r, BLOCK_D=block_d)
    return out
