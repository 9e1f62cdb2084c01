"""structlog configured once: JSON lines for services, a pretty console for the CLI.

Per-task context (``req_id``, ``group``, ``epoch``) is bound with ``structlog.contextvars`` so every log
line of a batch or request carries it without passing loggers around. Event names live in ``Event``.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from typing import Any

import structlog

_configured: str | None = None


class Event(StrEnum):
    SERVICE_STARTED = "service_started"
    SERVICE_STOPPED = "service_stopped"
    REQUEST_REJECTED = "request_rejected"
    REQUEST_SHED = "request_shed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    BATCH_DONE = "batch_done"
    BATCH_FAILED = "batch_failed"
    PLAN_PUBLISHED = "plan_published"
    LEADER_ELECTED = "planner_leader_elected"
    LEADER_LOST = "planner_leader_lost"
    PLAN_SWITCHED = "plan_switched"
    PLAN_UNCHANGED = "plan_unchanged"
    PLAN_WAITING = "plan_waiting_for_workers"
    PLAN_UNPLACED = "plan_unplaced_replicas"
    WORKER_DEVICES = "worker_devices_changed"
    LATENCY_CALIBRATED = "latency_calibrated"
    PLAN_SWITCH_TIMEOUT = "plan_switch_timeout"
    GROUP_DRAINED = "group_drained"
    REPLICA_STARTED = "replica_started"
    REPLICA_EXITED = "replica_exited"
    DEAD_LETTERED = "dead_lettered"
    RECLAIMED = "reclaimed"
    REDIS_RECONNECT = "redis_reconnect"
    MALFORMED = "malformed_message"
    STREAM_SWEPT = "retired_stream_swept"


def configure(fmt: str = "json", level: str = "info", *, force: bool = False) -> None:
    """Configure structlog (idempotent unless ``force``). ``fmt``: ``json`` or ``console``."""
    global _configured
    if _configured == fmt and not force:
        return
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = fmt


def get_logger(name: str, **bound: Any) -> Any:
    """A lazy logger: it binds on first use, so module-level loggers follow a later ``configure``."""
    return structlog.get_logger(name, **bound)


def bind(**kw: Any) -> None:
    """Bind request/group/epoch context for the current task (contextvars)."""
    structlog.contextvars.bind_contextvars(**kw)


def unbind(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)
