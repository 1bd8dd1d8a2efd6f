"""The RCAR head on the reference math: the head module's own vectorised and loop forwards
(dropout and autograd included). Every "rcar" backend has the signature

    fn(head, img, cap, lens) -> (n_img, n_cap)

where `head` is the RCAR head module (weights under the official names, plus regulator,
steps, direction, smooth) and `lens` arrives validated (int64 on cap's device)."""
from rcar_fast.ops.backend import Backend, output_dtype


class RcarReference(Backend):
    op, backend, kernel = "rcar", "reference", "the vectorised reference"

    @staticmethod
    def fn(head, img, cap, lens):
        return head.forward_vectorized(img, cap, lens).to(output_dtype(img.dtype))


class RcarReferenceLoop(Backend):
    op, backend, kernel = "rcar", "reference_loop", "the reference loop"

    @staticmethod
    def fn(head, img, cap, lens):
        return head.forward_loop(img, cap, lens).to(output_dtype(img.dtype))
