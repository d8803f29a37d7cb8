"""The one error type for mistakes in what a user gave us.

A UserError is caught by the CLI, printed as one line (where, what, fix) and
turned into exit status 2 before any training starts. Everything else is a bug
or a fault inside a run and is handled elsewhere.
"""

import difflib


def _one_line(text) -> str:
    """A message quoted from elsewhere (a plugin's exception, a parser's) may span lines; ours is one."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def did_you_mean(name: str, known, otherwise: str) -> str:
    """The fix for an unknown name: the closest known one, else `otherwise`."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'?" if close else otherwise


class UserError(Exception):
    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = _one_line(where), _one_line(problem), _one_line(fix) if fix else None
        super().__init__(str(self))

    def __str__(self) -> str:
        line = f"{self.where}: {self.problem}"
        return f"{line}; fix: {self.fix}" if self.fix else line
