"""Errors with a cause and a fix, for one-line reporting (no tracebacks for users)."""

from __future__ import annotations

import errno as _errno
import os


class XdplbError(Exception):
    """Something a user can cause or fix. `exit_code` follows the CLI contract."""

    exit_code = 2


class ConfigError(XdplbError):
    """One or more configuration problems, each a line naming the key and VIP/backend."""

    exit_code = 1

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class BpfError(XdplbError):
    """A libbpf or bpf() call failed; carries errno and says what failed."""

    def __init__(self, what: str, err: int):
        self.errno = abs(err)
        self.what = what
        super().__init__(f"{what}: {os.strerror(self.errno)} (errno {self.errno}, "
                         f"{_errno.errorcode.get(self.errno, '?')})")


class VerifierError(BpfError):
    """The kernel verifier rejected a program; `log` holds its log."""

    def __init__(self, what: str, err: int, log: str):
        self.log = log
        super().__init__(what, err)
        tail = "\n".join(log.strip().splitlines()[-12:])
        self.args = (f"verifier rejected {what} (errno {self.errno}); last lines of its "
                     f"log:\n{tail}",)
