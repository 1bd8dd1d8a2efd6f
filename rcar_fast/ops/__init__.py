"""The ops: one module per op family, and what they share.

    backend.py   what backends share: environment probes (the one loader of the native
                 extension), Inputs, the Backend base class and the bases of the backend kinds
                 (C++ CPU, Triton, CUDA tile), the choice among an op's backends and AUTO_ORDER
    library.py   the generic torch.library machinery (an op, its backward op, fakes and
                 autograd in one call; vjp; pair lists through an all-pairs backend)
    scorer.py    the Scorer base class (a head family, as the consumers see it)
    scan.py      SCAN ("scan", "scan_pairs"): custom ops, backends, scan_similarity, ScanScorer
    rcar.py      RCAR ("rcar", "rcar_pairs"): custom ops, backends (the wrapper is
                 rcar_fast.modules.RCARSimilarity)
    maxsim.py    the S-only heads and MaxSim ("maxsim", "maxsim_pairs"): custom ops, backends,
                 max_similarity, maxsim, MaxsimScorer
    gram.py      the per-image Gram ("gram"): backends and gram

Nothing registers on import: each op module lists its backend classes in BACKENDS, and
rcar_fast.dispatch.TABLE assembles them from its OP_MODULES.
"""
