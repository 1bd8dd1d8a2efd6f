"""Offline sm_90 compile stats (registers, spills, shared memory) of kernels/rcar_backward.py's
launches, no GPU: the launches rcar_backward.run makes on CPU tensors are recorded and compiled
as triton's launcher would (tests/sm90.py). Run without TRITON_INTERPRET:

    PYTHONPATH=. python scripts/sm90_rcar_backward.py '[["coop_rcar", 2, "t2i", "fp32", true, 256]]'

A case: regulator, steps, direction, fp32 | bf16 (inputs; GEMM operands: operand_dtypes), training
(dropout), sim_dim. d = 1024, R = 36, captions of up to 30 words."""
import json, sys
import torch
from rcar_fast.modules import RCARSimilarity
from rcar_fast.heads import module_counts
from rcar_fast.ops.rcar import pack_weights
from rcar_fast.kernels import rcar_backward as K
from tests import sm90

CASES = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [
    ["coop_rcar", 2, "t2i", "fp32", True, 256], ["coop_rcar", 2, "i2t", "bf16", True, 256]]
launches, owners = [], []
for case, (reg, steps, direction, op, training, sim_dim) in enumerate(CASES):
    (rec,) = sm90.record(K, "_rcar_pair_kernel")
    head = RCARSimilarity(embed_dim=1024, sim_dim=sim_dim, regulator=reg, steps=steps, direction=direction)
    dtype = torch.float32 if op == "fp32" else torch.bfloat16
    img = torch.zeros(4, 36, 1024, dtype=dtype)
    lens = [12, 30, 1, 9, 23]
    cap = torch.zeros(5, 32, 1024, dtype=dtype)
    w = pack_weights(head, torch.float32, False)
    opts = dict(regulator=reg, steps=steps, module_counts=module_counts(reg, steps), direction=direction, smooth=10.0, seed=5, dropout_on=training)
    K.run(img, cap, lens, w, **opts)                              # forward (dropout) launch
    K.run(img, cap, lens, w, grad=torch.ones(4, 5), **opts)       # the two backward passes
    for nargs, kwargs in rec.launches:
        if op != "fp32":
            kwargs = dict(kwargs, PREC="tf32")   # what a GPU launch of low-precision inputs uses
        launches.append((rec.jit_fn, {**nargs, **kwargs}, None))
        owners.append(dict(case=case, sim_dim=sim_dim, regulator=reg, steps=steps, direction=direction, op=op,
                           FORWARD_ONLY=kwargs["FORWARD_ONLY"], OWNER_IS_QUERY=kwargs["OWNER_IS_QUERY"],
                           WANT_W=kwargs["WANT_W"], DROPOUT=kwargs["DROPOUT"], QP=kwargs["QP"], CP=kwargs["CP"],
                           num_warps=kwargs.get("num_warps")))
    K._rcar_pair_kernel = rec.real
sm90.emit_by_case(launches, owners, len(CASES))
