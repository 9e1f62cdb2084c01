"""A scenario's result, its targets, and the suite's table and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from tools.faults.accountant import Verdict
from tools.faults.live import Restarts
from tools.faults.procs import Proc, short


@dataclass
class Target:
    name: str
    met: bool
    value: str  # what was measured, as text ("0", "99.4%")
    want: str  # the target, as text ("0", "≥ 99%")


@dataclass
class Result:
    name: str
    verdict: Verdict
    restarts: Restarts = field(default_factory=Restarts)
    leftovers: list[Proc] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None  # the scenario itself failed (its figures are partial)

    def target(self, name: str, met: bool, value: object, want: str) -> None:
        self.targets.append(Target(name, bool(met), str(value), want))

    def standard(self) -> None:
        """The targets every scenario has: lost 0, duplicated 0, no process left over."""
        self.target("lost", self.verdict.lost == 0, self.verdict.lost, "0")
        self.target("duplicated", self.verdict.duplicated == 0, self.verdict.duplicated, "0")
        self.target("leftovers", not self.leftovers, len(self.leftovers), "0")

    @property
    def met(self) -> bool:
        return self.error is None and all(t.met for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "met": self.met, "error": self.error, "duration_s": round(self.duration_s, 1),
                "account": self.verdict.to_dict(), "restarts": self.restarts.to_dict(),
                "leftovers": [{"pid": p.pid, "cmd": p.cmd} for p in self.leftovers],
                "targets": [t.__dict__ for t in self.targets], "extra": self.extra}


def _errors(v: Verdict) -> str:
    return ", ".join(f"{k}={n}" for k, n in sorted(v.errors.items())) or "-"


def _restarts(r: Restarts) -> str:
    parts = [f"{k}={n}" for k, n in sorted(r.services.items()) if n]
    if r.takeovers:
        parts.append(f"takeovers={r.takeovers}")
    if r.agent_restarts:
        parts.append(f"replica-restarts={r.agent_restarts}")
    return ", ".join(parts) or "0"


def table(results: list[Result], title: str) -> Table:
    t = Table(title=title, show_lines=False)
    for col, just in (("scenario", "left"), ("sent", "right"), ("ok", "right"), ("ok in budget", "right"),
                      ("errors by code", "left"), ("lost", "right"), ("dup", "right"), ("restarts", "left"),
                      ("leftovers", "right"), ("target met?", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for res in results:
        v = res.verdict
        missed = [f"{x.name} {x.value} (want {x.want})" for x in res.targets if not x.met]
        if res.error:
            missed.insert(0, f"error: {res.error}")
        t.add_row(res.name, str(v.sent), str(v.ok), f"{v.ok_in_budget_pct:.1f}%", _errors(v), str(v.lost),
                  str(v.duplicated), _restarts(res.restarts), str(len(res.leftovers)),
                  "yes" if res.met else "NO: " + "; ".join(missed))
    return t


def markdown(results: list[Result]) -> str:
    rows = ["| scenario | sent | ok | ok in budget | errors by code | lost | duplicated | restarts | leftovers | target met? |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        v = res.verdict
        missed = [f"{x.name} {x.value} (want {x.want})" for x in res.targets if not x.met]
        if res.error:
            missed.insert(0, f"error: {res.error}")
        rows.append(f"| {res.name} | {v.sent} | {v.ok} | {v.ok_in_budget_pct:.1f}% | {_errors(v)} | {v.lost} | "
                    f"{v.duplicated} | {_restarts(res.restarts)} | {len(res.leftovers)} | "
                    f"{'yes' if res.met else 'NO: ' + '; '.join(missed)} |")
    return "\n".join(rows)


def write(out: Path, results: list[Result], meta: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "faults.json"
    path.write_text(json.dumps({**meta, "met": all(r.met for r in results),
                                "scenarios": [r.to_dict() for r in results]}, indent=1, default=str))
    (out / "faults.md").write_text(markdown(results) + "\n")
    return path


def leftover_names(procs: list[Proc]) -> list[str]:
    return [f"{short(p.cmd)} [{p.pid}]" for p in procs]
