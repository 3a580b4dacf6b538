"""The ``neutra-flows`` command's quiet start: TensorFlow's start-up chatter off before it loads.

The command's first screen used to be TensorFlow's, not ours: absl's "All log
messages before absl::InitializeLog() is called are written to STDERR", the
cudart stub's "Could not find cuda drivers" (twice), the ``failed call to
cuInit`` error, TFP's TensorFloat-32 warning and ArviZ's daily notice that it
is "undergoing a major refactor". ``import neutra_flows`` imports TensorFlow,
before any line of :mod:`neutra_flows.app.cli` runs, so the package calls
:func:`quiet_command_start` first and it recognises the command from the
process's command line: the ``neutra-flows`` console script, ``python -m
neutra_flows`` or ``python -m neutra_flows.app.cli``. A library import changes
nothing (neither the environment nor the warning filters).

Measured with TensorFlow 2.21 and TFP 0.25 on a CPU machine:
``TF_CPP_MIN_LOG_LEVEL=2`` hides the I- and W-lines once absl's logging is up,
3 the ``cuInit`` E-line too; the lines printed while TensorFlow's libraries
load ignore the variable, so the command imports TensorFlow with file
descriptor 2 pointed at ``/dev/null`` (a Python error from that import is
raised after it is restored). A user's own ``TF_CPP_MIN_LOG_LEVEL`` is kept;
0 or 1 (asking for TensorFlow's info or warning lines) also keeps the loading
lines visible.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = ["is_command", "quiet_command_start"]

_SCRIPTS = ("neutra-flows", "neutra-flows.exe", "neutra-flows-script.py")
_MODULES = ("neutra_flows", "neutra_flows.__main__", "neutra_flows.app.cli")
# Warnings raised while the command loads its libraries, matched from their start.
_START_UP_WARNINGS = (
    (r"TensorFloat-32 matmul/conv are enabled", UserWarning),
    (r"\s*ArviZ is undergoing a major refactor", FutureWarning),
)


def is_command() -> bool:
    """Whether this process is the ``neutra-flows`` command (not a program importing the library)."""
    argv = sys.argv or [""]
    if argv[0] == "-m":  # python -m MODULE, while MODULE's package is imported
        return _module_run(getattr(sys, "orig_argv", [])) in _MODULES
    return os.path.basename(argv[0]) in _SCRIPTS


def _module_run(orig_argv: list[str]) -> str | None:
    for i, arg in enumerate(orig_argv[1:], start=1):
        if arg == "-m":
            return orig_argv[i + 1] if i + 1 < len(orig_argv) else None
        if arg.startswith("-m"):
            return arg[2:]
    return None


def quiet_command_start() -> None:
    """In the command only: TensorFlow's log threshold, the start-up warnings' filters, and
    TensorFlow loaded with standard error silenced. Call it before TensorFlow is imported."""
    if not is_command():
        return
    for message, category in _START_UP_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if level in ("0", "1"):
        return
    with _stderr_silenced():
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 (what C++ libraries write to) pointed at /dev/null, then restored."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield  # no usable standard error: nothing to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
