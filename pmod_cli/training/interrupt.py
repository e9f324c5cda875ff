"""Ctrl-C (SIGINT) and SIGTERM during a training run: stop at a step boundary, saving if quick.

    watch = SignalWatch()
    with watch.installed():
        ...                        # setting up: a signal stops at once (nothing was written yet)
        watch.phase = "training"   # from here a signal is noted, and ``StopOnSignal`` (a Trainer
        trainer.train()            # callback) ends the run after the step under way
        watch.phase = "finishing"  # saving the final model: a signal waits until it is done

A signal during the training loop lets the current optimizer step finish. At its end every
process learns (one all-reduce per step) whether any of them was signalled, so all stop at
the same step; they save a checkpoint there together if the last save took (or the
checkpoint's size suggests it takes) at most ``SAVE_ON_STOP_SECONDS``: launchers (torchrun,
the deepspeed launcher, Slurm, Kubernetes) send SIGTERM and kill about 30 s later. The run
then ends with ``RunInterrupted``: one line saying where it stopped and what ``--resume``
starts from, exit code 128 + the signal (130 for SIGINT, 143 for SIGTERM). A second signal,
sent at least ``REPEAT_SECONDS`` after the first, stops at once without saving (the
checkpoints already written are complete: they are renamed into place whole).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from ..errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a checkpoint is saved on the way out only if it should take at most this long
SAVE_ON_STOP_SECONDS = 20.0
# a launcher forwards the terminal's Ctrl-C to its workers, which got it already: a repeat this
# soon is the same request, not a second one
REPEAT_SECONDS = 2.0


class RunInterrupted(UserError):
    """The run stopped on a signal; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class SignalWatch:
    """Notes SIGINT / SIGTERM while installed (see the module docstring)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.phase = "setup"  # "setup", "training" (the loop owns the stopping) or "finishing"
        self.describe_now: Callable[[int], str] = lambda signum: "nothing was saved by this run"
        self._first_at = 0.0

    @contextmanager
    def installed(self) -> Iterator[SignalWatch]:
        """Handlers for SIGINT and SIGTERM, restored on exit (only the main thread can set them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # a signal ignored at start (a job started with `nohup` or in the background of a script)
        # stays ignored: whoever started the run chose that
        previous = {
            signum: signal.signal(signum, self._handle)
            for signum in SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
            if self.phase == "setup":
                raise RunInterrupted(
                    f"stopped by {signal_name(signum)} before training started; nothing was written",
                    signum,
                )
            return
        if now - self._first_at >= REPEAT_SECONDS and self.phase == "training":
            self.phase = "stopping"  # the line below is said once
            raise RunInterrupted(
                f"stopped by a second {signal_name(signum)} during the step under way, without saving; "
                f"{self.describe_now(signum)}",
                signum,
            )


class StopOnSignal(TrainerCallback):
    """At each step end: did any process get a signal? Then stop there, saving if it is quick.

    ``save_seconds()`` estimates how long a checkpoint takes to save (a collective decision
    follows, so every process gets the same answer)."""

    def __init__(self, watch: SignalWatch, save_seconds: Callable[[], float]) -> None:
        self.watch = watch
        self.save_seconds = save_seconds
        self.stopped_at: int | None = None
        self.saved_on_stop = False
        self.estimated_seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if on_every_rank(self.watch.received is None, args.device):
            return
        self.stopped_at = state.global_step
        self.estimated_seconds = self.save_seconds()
        quick = on_every_rank(self.estimated_seconds <= SAVE_ON_STOP_SECONDS, args.device)
        control.should_training_stop = True
        if quick:
            control.should_save = True
        self.saved_on_stop = bool(control.should_save)


def on_every_rank(flag: bool, device: torch.device | str) -> bool:
    """True only if ``flag`` holds on every process (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
