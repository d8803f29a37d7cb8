"""The one error type for mistakes in what a user gave us.

A UserError is caught by the CLI, printed as one line (where, what, fix) and
turned into exit status 2 before any training starts. Everything else is a bug
or a fault inside a run and is handled elsewhere.
"""


class UserError(Exception):
    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        line = f"{self.where}: {self.problem}"
        return f"{line}; fix: {self.fix}" if self.fix else line
