"""The doctor's result records: one ``Check`` per row, a ``Report`` that aggregates them into an exit code.

Exit codes: 0 when nothing failed (WARN rows allowed), 1 when a check failed, 2 when ``--gpu`` was
asked for on a host where no GPU check can run at all (no CUDA) — the one case the doctor stops early.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_CUDA = 2


class Status(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    """One row: what was checked, the verdict, the measured figure, why, and what to do (``fix``)."""

    name: str
    status: Status
    figure: str
    detail: str = ""
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the raw numbers behind ``figure``

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": str(self.status), "figure": self.figure, "detail": self.detail,
                "fix": self.fix, "data": self.data}


def passed(name: str, figure: str, detail: str = "", data: dict[str, Any] | None = None) -> Check:
    return Check(name, Status.PASS, figure, detail, "", data or {})


def warned(name: str, figure: str, detail: str, fix: str, data: dict[str, Any] | None = None) -> Check:
    return Check(name, Status.WARN, figure, detail, fix, data or {})


def failed(name: str, figure: str, detail: str, fix: str, data: dict[str, Any] | None = None) -> Check:
    return Check(name, Status.FAIL, figure, detail, fix, data or {})


@dataclass(slots=True)
class Report:
    gpu: bool  # were the GPU checks asked for
    checks: list[Check] = field(default_factory=list)
    error: str = ""  # set when the doctor stopped early (EXIT_NO_CUDA)

    def extend(self, checks: Iterable[Check]) -> None:
        self.checks.extend(checks)

    def counts(self) -> dict[str, int]:
        return {str(s): sum(1 for c in self.checks if c.status is s) for s in Status}

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_NO_CUDA
        return EXIT_FAILED if any(c.status is Status.FAIL for c in self.checks) else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "exit_code": self.exit_code, "gpu": self.gpu,
                               "summary": self.counts(), "checks": [c.to_dict() for c in self.checks]}
        if self.error:
            out["error"] = self.error
        return out
