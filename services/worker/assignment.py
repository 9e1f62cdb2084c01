"""Which replica slot serves which group when a plan changes — pure logic, no processes, no Redis.

A *slot* is one logical replica on one device: a stable consumer name, a model, a share, the group
it serves actively and the retired streams it still drains. A slot runs in some replica process;
the process can change (a warm standby takes over a slot whose process died) while the slot — and
so the consumer name owning its pending entries — stays.

On a new epoch, ``retarget`` turns the plan's placements on this agent's devices into slots:

1. every slot's active group of an older epoch is retired: its stream joins the slot's drains;
2. each placement takes a free slot (no active group) on its device serving the same model — with
   the same share on a GPU, where a process's share is fixed when CUDA starts (on a CPU a process can
   change its thread count, so any share fits, the same one preferred) — preferring the slot whose
   last group had the same cuts. Such a slot is re-targeted: its process keeps its loaded model and
   its warm caches, and the new group's stream has a consumer at once;
3. placements left over get new slots (the agent hands them to a standby process or starts one).

Slots without an active group finish their drains and are then released. Nothing here needs more
than the plan's placements and the slots, so a plan switch is checked in unit tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.worker.control import Task


@dataclass(frozen=True, slots=True)
class Wanted:
    """One placement of the new plan on this agent: group task on ``device`` at ``share``."""

    device: str
    model: str
    share: int
    task: Task


@dataclass(slots=True)
class Slot:
    consumer: str
    device: str
    model: str
    share: int
    gpu: bool
    active: Task | None = None
    draining: list[str] = field(default_factory=list)
    last_cuts: tuple[int, ...] = ()

    @property
    def streams(self) -> tuple[str, ...]:
        active = () if self.active is None else (self.active.stream,)
        return active + tuple(s for s in self.draining if s not in active)

    @property
    def idle(self) -> bool:
        return self.active is None and not self.draining

    def retire(self, epoch: int) -> None:
        """Move an active group of an epoch older than ``epoch`` to the drains."""
        if self.active is not None and self.active.epoch < epoch:
            if self.active.stream not in self.draining:
                self.draining.append(self.active.stream)
            self.last_cuts = self.active.cuts
            self.active = None

    def drained(self, stream: str) -> None:
        if stream in self.draining:
            self.draining.remove(stream)


def consumer_name(device: str, model: str, k: int) -> str:
    return f"{device}-{model}-{k}"


def _fits(slot: Slot, want: Wanted) -> bool:
    return (slot.active is None and slot.device == want.device and slot.model == want.model
            and (not slot.gpu or slot.share == want.share))


def _preference(slot: Slot, want: Wanted) -> tuple[int, int, str]:
    return (0 if slot.last_cuts == want.task.cuts else 1, 0 if slot.share == want.share else 1, slot.consumer)


def retarget(slots: Sequence[Slot], wanted: Iterable[Wanted], epoch: int, *, gpu_devices: frozenset[str]) -> list[Slot]:
    """Apply a new epoch's placements to ``slots`` (modified in place); returns the slots created."""
    for slot in slots:
        slot.retire(epoch)
    used = {s.consumer for s in slots}
    created: list[Slot] = []
    pending = sorted(wanted, key=lambda w: (w.device, w.model, w.task.group, -w.share))
    for want in pending:
        free = [s for s in slots if _fits(s, want)] + [s for s in created if _fits(s, want)]
        if free:
            slot = min(free, key=lambda s: _preference(s, want))
        else:
            k = 0
            while consumer_name(want.device, want.model, k) in used:
                k += 1
            slot = Slot(consumer_name(want.device, want.model, k), want.device, want.model, want.share,
                        want.device in gpu_devices)
            used.add(slot.consumer)
            created.append(slot)
        slot.active = want.task
        slot.share = want.share
        if want.task.stream in slot.draining:  # the same stream again (an epoch cannot repeat, but be safe)
            slot.draining.remove(want.task.stream)
    return created
