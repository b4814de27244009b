"""Exit codes of every spade-dist command, in one place (their meaning: docs/FORMATS.md, "Exit codes").

Batch scripts decide on the run directory's markers (DONE / REQUEUE), not on these codes alone:
launchers translate a worker's code (``accelerate launch`` reports 1 for a 75). Imports nothing, so
that the config module and shell helpers can use it.
"""
from __future__ import annotations

EXIT_OK = 0
# Something the project did not anticipate (a bug): the only case that prints a traceback.
EXIT_FAILURE = 1
# Bad input a user can fix: an argument, a config key or value, a file's content, a busy port or run
# directory. One line ``PROG: error: ...`` on stderr.
EXIT_USAGE = 2
# The machine failed the command, not its input: disk full, read-only or vanished directory, I/O error.
# One line naming the path, the cause and what to do; nothing committed is lost, and a rerun (or resume)
# once the environment is fixed continues. sysexits.h EX_IOERR.
EXIT_ENVIRONMENT = 74
# A run committed a checkpoint and stopped because it was asked to (signal, Ctrl-C, STOP file): restart
# it to continue. The default of checkpoint.requeue_exit_code; sysexits.h EX_TEMPFAIL.
EXIT_REQUEUE = 75
# The run-health monitor stopped the run (a signal with policy stop, docs/HEALTH.md): nothing was
# checkpointed after the signal fired; the one line names the signal and the last healthy checkpoint.
EXIT_UNHEALTHY = 76
# The codes checkpoint.requeue_exit_code may take: 0-2, 74 and 76 mean the above; above 125 the shell
# reserves codes (126/127: not executable / not found, 128+N: killed by signal N).
REQUEUE_EXIT_RANGE = (3, 125)
# A second Ctrl-C: aborted at once, without a checkpoint (128 + SIGINT, what a shell reports).
EXIT_INTERRUPTED = 130


def requeue_code_problem(code: int) -> str:
    """Why ``code`` cannot be the requeue exit code, or "" when it can."""
    low, high = REQUEUE_EXIT_RANGE
    if not low <= code <= high:
        return f"must be in {low}..{high}, got {code}"
    if code == EXIT_ENVIRONMENT:
        return f"{code} means an environment failure (disk full, read-only directory); choose another"
    if code == EXIT_UNHEALTHY:
        return f"{code} means the run-health monitor stopped the run; choose another"
    return ""
