"""rcar_fast benchmark suite.

    python -m bench                 # quick suite on CPU, full suite when a GPU is visible
    python -m bench --quick         # a few minutes on a 2-core CPU
    python -m bench --full          # the GPU suite (COCO-sized sweeps, loss at B = 128, 256)
    python -m bench --tiny --out /tmp/x   # seconds: every code path once (used by the tests)
    python -m bench --gpu-check --out DIR [--max-minutes M]  # ~4 min on a GPU: COCO 5K vs ceilings
    python -m bench --gpu-check --dry-run --out DIR          # the same steps, tiny, on a CPU
    rcar-fast bench ...             # the same command through the CLI

For each op (SCAN t2i / i2t, RCAR regulator modes) and mode (forward, backward, training
step) it sweeps shapes (n_img x n_cap, caption length, d, dtype) over every backend usable
here (rcar_fast.dispatch) and the baselines (loop reference, vectorised reference, the
vectorised reference under torch.compile), plus the sparse hardest-negative loss against
the full B x B one. Results go to bench/results/<device>.csv (appended), with the run's
device facts, a Markdown summary and plots beside it (bench/report.py).

Modules: cases (what is measured), suite (running it), gpu_check (the GPU check's steps),
measure (time, memory), flops (FLOP models), device (device facts, peak table), report (CSV,
Markdown, plots).
"""
