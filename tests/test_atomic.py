"""rcar_fast.atomic: files appear complete or not at all, signals included."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rcar_fast.atomic import Terminated, atomic_path, check_output_path


def test_success_renames_into_place(tmp_path):
    with atomic_path(tmp_path / "a.bin") as tmp:
        assert tmp.endswith(".partial") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"x")
    assert os.listdir(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"x"


def test_an_error_leaves_nothing_and_keeps_an_old_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "a.bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise ZeroDivisionError("in the middle of a write")
    assert os.listdir(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old"


def test_sigterm_cleans_up_then_reaches_the_previous_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(Terminated):
            with atomic_path(tmp_path / "a.bin") as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)           # the handler runs before this returns
        time.sleep(0.1)
        assert received == [signal.SIGTERM]
        assert os.listdir(tmp_path) == []
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("what,make", [
    ("--save", lambda p: (p / "folder").mkdir() or p / "folder"),
    ("--json", lambda p: p / "missing" / "out.json"),
])
def test_check_output_path_refuses_before_any_work(tmp_path, what, make):
    with pytest.raises((ValueError, FileNotFoundError), match=f"{what} .*(is a folder|does not exist)"):
        check_output_path(make(tmp_path), what)


SLOW_ALL_PAIRS = textwrap.dedent("""
    import sys, time, torch
    from rcar_fast.evaluation import all_pairs

    def slow(img, cap, lens):
        time.sleep(0.2)
        return torch.einsum("ird,cld->ic", img, cap)

    img, cap = torch.randn(40, 3, 4), torch.randn(200, 5, 4)
    lens = torch.full((200,), 5)
    print("started", flush=True)
    all_pairs(img, cap, lens, slow, img_block=2, cap_block=10, out_path=sys.argv[1],
              progress=False)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_all_pairs_leaves_no_partial_file(tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ALL_PAIRS, str(out / "sims.npy")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        # The temporary file is created empty, then the memmap gives it its full size: wait for
        # that (under load the child can sit between the two for a while).
        while not any(name.endswith(".partial") and os.path.getsize(out / name) > 0
                      for name in os.listdir(out)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the full-size partial file never appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signum, proc.stderr.read().decode()
    assert os.listdir(out) == []


def test_a_signal_while_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The window between creating the temporary file and the cleanup's bookkeeping: an
    interrupt raised right after os.open (before _create_temporary returns) still removes it."""
    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        os.close(fd)
        raise KeyboardInterrupt   # as SIGINT would, at the next bytecode
    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "a.bin"):
            pass
    assert os.listdir(tmp_path) == []


def test_an_ignored_sigterm_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            with open(tmp, "wb") as f:
                f.write(b"done")
        assert (tmp_path / "a.bin").read_bytes() == b"done"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
