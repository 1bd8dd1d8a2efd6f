"""The project's one way to write a file: under a temporary name in the target's folder,
renamed into place only when complete, removed on any failure -- a SIGTERM or SIGINT
included -- so no half-written file (and no ``*.partial`` file) is ever left behind.

SIGINT already arrives as ``KeyboardInterrupt``. SIGTERM kills a Python process without
running any cleanup, so while a write is in progress (main thread only: Python runs signal
handlers there) SIGTERM is turned into a ``Terminated`` exception; once the temporary file
is removed, the previous handler is put back and the signal is delivered again, so the
process ends as SIGTERM would have ended it (or the caller's own handler runs).

``check_output_path`` refuses a target that cannot be written (a folder, a missing parent
folder) before any computation starts.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading

__all__ = ["atomic_path", "check_output_path", "Terminated", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"


class Terminated(BaseException):
    """SIGTERM arrived while a file was being written (re-delivered after the cleanup)."""


@contextlib.contextmanager
def _sigterm_as_exception():
    """Within the block SIGTERM raises Terminated; after it, a caught SIGTERM is re-sent."""
    previous = (signal.getsignal(signal.SIGTERM)
                if threading.current_thread() is threading.main_thread() else None)
    if previous is None or previous is signal.SIG_IGN:
        # Not the main thread (no handlers there), an ignored SIGTERM (left ignored), or a
        # handler installed outside Python (kept).
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    terminated = False
    try:
        yield
    except Terminated:
        terminated = True
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if terminated:
            os.kill(os.getpid(), signal.SIGTERM)


def check_output_path(path, what: str = "output file") -> str:
    """``path`` as a str when a file can be written there: not a folder, its folder exists
    and is writable. Raises ValueError / FileNotFoundError / PermissionError naming
    ``what`` (e.g. "--save") otherwise. Call it before the computation."""
    path = os.fspath(path)
    if path == "" or path.endswith(os.sep):
        raise ValueError(f"{what} must name a file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; give a file name (e.g. "
                         f"{os.path.join(path, 'sims.npy')})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {path}: the folder {folder} does not exist; create "
                                f"it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{what} {path}: the folder {folder} is not writable")
    return path


def _create_temporary(folder: str, name: str, claimed: list) -> str:
    """A new empty file ``name.<random>.partial`` in folder, with the umask's permissions
    (mkstemp would make it private). Each name is put in ``claimed`` before the file is
    created, so that a signal arriving between the creation and the caller's bookkeeping still
    finds it; a name that turns out to be another writer's file is taken out again."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        claimed.append(tmp)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            claimed.pop()
    raise FileExistsError(f"cannot create a temporary file for {name} in {folder}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path``; on success it is renamed to ``path``, on
    any exception or signal it is removed and the exception re-raised.

        with atomic_path("sims.npy") as tmp:
            with open(tmp, "wb") as f:   # (np.save(tmp) would append ".npy" to the name)
                np.save(f, array)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with _sigterm_as_exception():
        claimed = []
        try:
            # Inside the try: a signal right after the file is created must remove it too.
            tmp = _create_temporary(folder, os.path.basename(path), claimed)
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            for name in claimed:
                with contextlib.suppress(OSError):
                    os.remove(name)
            raise
