"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, model name).

    The CLI prints ``fastafd: error: <message>`` on one line and exits with code 2,
    without a traceback. The message must name the problem and the fix.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always a single line


class RunStopped(Exception):
    """A run that cannot go on (e.g. non-finite losses for too many steps): one line, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Stopped(Exception):
    """A run stopped on request (SIGTERM) after writing its checkpoint: one line (not an error), exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code
