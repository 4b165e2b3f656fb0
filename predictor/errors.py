"""The one exception type for user mistakes.

The CLI turns a `SpecError` into a one-line message and exit status 2, so every raise site
names the field that is wrong and, where it helps, what to do instead. Programming errors stay
ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A bad spec, preset name, config.json or argument, reported without a traceback."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)
