"""Sharded evaluation with torch.distributed: 2 gloo processes on CPU give exactly what one
process gives (full matrix, .npy output, top-k lists), with uneven shards."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcar_fast import data, evaluation

N_IMAGES = 13          # 4 image blocks of 4, 4, 4, 1 rows: shards of 8 and 5 rows
BLOCKS = dict(img_block=4, cap_block=11)


def the_set():
    return data.synthetic(n_images=N_IMAGES, regions=5, dim=24, min_len=2, max_len=8, seed=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = the_set()
        stats = {}
        full = evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                                    progress=False, stats=stats, **BLOCKS)
        on_disk = evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                                       progress=False, out_path=os.path.join(out_dir, "sims.npy"),
                                       **BLOCKS)
        top = evaluation.all_pairs_topk(ds.img, ds.cap, ds.lens, "scan", k=4,
                                        backend="reference", progress=False, **BLOCKS)
        if rank == 0:
            torch.save({"full": full, "top": tuple(top), "stats": stats,
                        "on_disk_type": type(on_disk).__name__},
                       os.path.join(out_dir, "rank0.pt"))
        else:
            # Other ranks get nothing back and computed only their shard.
            assert full is None and on_disk is None and top is None
            torch.save({"stats": stats}, os.path.join(out_dir, "rank1.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
    return out_dir, torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False), \
        torch.load(os.path.join(out_dir, "rank1.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single_process():
    ds = the_set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the workers: identical arithmetic, identical bits
    try:
        full = evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                                    progress=False, **BLOCKS)
        top = evaluation.all_pairs_topk(ds.img, ds.cap, ds.lens, "scan", k=4,
                                        backend="reference", progress=False, **BLOCKS)
    finally:
        torch.set_num_threads(threads)
    return full, top


def test_two_gloo_processes_equal_one_process(two_process_run, single_process):
    _, rank0, rank1 = two_process_run
    full, _ = single_process
    # Shards are whole image blocks, so every tile is the one a single process computes.
    assert torch.equal(rank0["full"], full)
    assert rank0["stats"]["world"] == 2 and rank1["stats"]["world"] == 2
    # Each rank scored its own shard: 8 and 5 images against all 65 captions.
    assert (rank0["stats"]["local_pairs"], rank1["stats"]["local_pairs"]) == (8 * 65, 5 * 65)


def test_distributed_npy_output_is_complete(two_process_run, single_process):
    out_dir, rank0, _ = two_process_run
    assert rank0["on_disk_type"] == "memmap"
    assert sorted(os.listdir(out_dir)) == ["rank0.pt", "rank1.pt", "sims.npy"]
    np.testing.assert_array_equal(np.load(os.path.join(out_dir, "sims.npy")),
                                  single_process[0].numpy())


def test_distributed_topk_equals_single_process(two_process_run, single_process):
    _, rank0, _ = two_process_run
    _, top = single_process
    for got, expected in zip(rank0["top"], top):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("block", [1, 4, 64])
def test_shards_are_whole_blocks_covering_the_rows_in_order(block):
    for n in (1, 5, 13, 100, 1001):
        for world in (1, 2, 3, 8):
            shards = [evaluation.shard_rows(n, r, world, block) for r in range(world)]
            assert shards[0][0] == 0 and shards[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
            assert all(a % block == 0 for a, _ in shards)
            n_blocks = [-(-(b - a) // block) for a, b in shards]
            assert max(n_blocks) - min(n_blocks) <= 1


def test_distributed_true_without_a_process_group_is_an_error():
    ds = data.synthetic(n_images=2, regions=2, dim=4, seed=0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        evaluation.all_pairs(ds.img, ds.cap, ds.lens, "scan", backend="reference",
                             distributed=True, progress=False)


def test_cli_demo_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m rcar_fast demo` shards over 2 gloo ranks; rank 0
    reports the same recall table as a single process."""
    import json
    import subprocess
    import sys

    from rcar_fast import cli

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = ["demo", "--size", "tiny", "--images", "20", "--dim", "16", "--backend",
            "reference", "--img-block", "8", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "rcar_fast", *demo,
                          "--json", str(tmp_path / "two.json")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("rcar-fast demo:") == 1          # only rank 0 prints
    assert cli.main(demo + ["--json", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["metrics"] == one["metrics"]
