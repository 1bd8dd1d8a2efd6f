"""Triton kernels of rcar_fast (importable as rcar_fast.kernels): one module per op holding
the @triton.jit kernels and their launch helpers, nothing else. Autograd and dispatch live in
rcar_fast/ops/."""
