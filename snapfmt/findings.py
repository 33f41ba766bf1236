"""Validation findings and the registry of semantic checks.

A check is a function ``fn(snapshot) -> Iterable[Finding]`` registered with
:func:`check`.  Structural problems found while *loading* are exceptions
(:class:`snapfmt.errors.FormatError`); everything a loaded snapshot can be
judged on is a Finding.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, Iterable

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES = (ERROR, WARNING, INFO)


@dataclass(frozen=True)
class Finding:
    code: str        # stable kebab-case id, e.g. "x86-cr0-pg-without-pe"
    severity: str    # "error" | "warning" | "info"
    location: str    # e.g. "x86.sregs[vcpu 0].cr0" or "section 3 (x86.regs[0])"
    message: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.location}: {self.message} [{self.code}]"


CheckFn = Callable[["object"], Iterable[Finding]]
_CHECKS: list[tuple[str | None, str, CheckFn]] = []


def check(name: str, arch: str | None = None):
    """Decorator: register a semantic check (arch None = every architecture)."""
    def deco(fn: CheckFn) -> CheckFn:
        _CHECKS.append((arch, name, fn))
        return fn
    return deco


def registered_checks(arch: str | None) -> list[tuple[str, CheckFn]]:
    return [(n, f) for (a, n, f) in _CHECKS if a is None or a == arch]
