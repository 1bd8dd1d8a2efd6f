"""The ops and their backends.

    backend.py            what backends share: environment probes (the one loader of the
                          native extension), Inputs, the Backend base class
    <op>_<backend>.py     one op's backend classes: scan_{reference,cpu,triton,cuda},
                          rcar_{reference,cpu,triton,cuda}, gram_backends, pair_backends
    scan.py, gram.py      the public op wrappers: validate, then rcar_fast.dispatch

Nothing registers on import: rcar_fast.dispatch.TABLE lists every backend class by op.
"""
