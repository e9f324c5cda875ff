"""How a ``pmod`` process ends; a process of a multi-process run skips the interpreter's teardown.

torch.distributed's gloo backend runs every collective on C++ worker threads. A worker finishes a
collective, wakes the caller, and only then lets go of the collective's tensors; letting go of a
tensor that came from Python takes the GIL. If the caller has meanwhile returned and the process is
exiting, the interpreter is being torn down: Python (3.11 here) ends a thread that asks for the GIL
then with ``pthread_exit``, which C++ cannot unwind there, so the process aborts with
"terminate called without an active exception" (SIGABRT) and the launcher stops the other
processes. It needs the worker to wait for a CPU from the last collective until the exit, so it
strikes at random, on a busy machine.

``torch.distributed.destroy_process_group()`` joins the workers only once nothing refers to the
group any more, and DeepSpeed keeps references (every ZeRO-3 parameter, its engine, module-level
caches) until the teardown itself. So a process that set up torch.distributed, with more than one
process in its run, ends here the way the interpreter would, but without its teardown: after a
successful command the process group is destroyed (this process is past its last collective), the
non-daemon threads are joined, the atexit handlers run, stdout and stderr are flushed, then
``os._exit``. Everything else leaves with ``sys.exit`` as usual.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Leave with exit status ``code``: ``sys.exit``, or the ending above in a multi-process run."""
    if not _in_multiprocess_run():
        sys.exit(code)
    if code == 0:
        code = _destroy_process_group()
    _python_exit_steps()
    os._exit(code)


def _in_multiprocess_run() -> bool:
    """torch.distributed is set up here, for more than one process (torchrun, the deepspeed launcher)."""
    torch = sys.modules.get("torch")  # commands that never import torch have no gloo threads
    if torch is None or not torch.distributed.is_available():
        return False
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _destroy_process_group() -> int:
    """0, or 1 if it failed (said on stderr): the process must still end as above."""
    import torch

    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - printed; raising here would end in the teardown again
        traceback.print_exc()
        return 1
    return 0


def _python_exit_steps() -> None:
    """What the interpreter does on exit before its teardown."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush, trackers' finish, temporary files
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that went away
            pass
