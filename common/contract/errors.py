"""One error hierarchy for all of Graft; each error maps 1:1 to a reply code on the wire.

    GraftError                      code INTERNAL
    ├── InvalidRequest              code INVALID_REQUEST   (malformed envelope, bad field, size limit)
    │   ├── UnknownModel            code UNKNOWN_MODEL
    │   ├── BadCut                  code BAD_CUT
    │   └── BadTensor               code BAD_TENSOR        (dtype/shape/bytes disagree or mismatch the cut)
    ├── DeadlineExceeded            code DEADLINE_EXCEEDED
    ├── Overloaded                  code OVERLOADED        (carries retry_after_ms)
    └── InternalError               code INTERNAL

Services catch ``GraftError`` at the edge and turn it into an error reply with ``error_from_reply``'s
inverse (``GraftError.code``/``message``); the client SDK turns an error reply back into the same class.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    BAD_CUT = "BAD_CUT"
    BAD_TENSOR = "BAD_TENSOR"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    OVERLOADED = "OVERLOADED"
    INTERNAL = "INTERNAL"


class GraftError(Exception):
    """Base of every error Graft raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(GraftError):
    code = ErrorCode.INVALID_REQUEST


class UnknownModel(InvalidRequest):
    code = ErrorCode.UNKNOWN_MODEL


class BadCut(InvalidRequest):
    code = ErrorCode.BAD_CUT


class BadTensor(InvalidRequest):
    code = ErrorCode.BAD_TENSOR


class DeadlineExceeded(GraftError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Overloaded(GraftError):
    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after_ms: int = 100, **details: Any) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms, **details)
        self.retry_after_ms = retry_after_ms


class InternalError(GraftError):
    code = ErrorCode.INTERNAL


class StoreUnavailable(InternalError):
    """The store (Redis) cannot be reached for a moment: back off and try again; nothing was lost.

    The serving path's store boundary (``common.store.protocol``) raises this, and only this, in place
    of redis-py's connection, timeout and cluster-down errors, so code above it knows one error of ours."""


_BY_CODE: dict[ErrorCode, type[GraftError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.UNKNOWN_MODEL: UnknownModel,
    ErrorCode.BAD_CUT: BadCut,
    ErrorCode.BAD_TENSOR: BadTensor,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.INTERNAL: InternalError,
}


def error_for_code(code: str, message: str, details: dict[str, Any] | None = None) -> GraftError:
    """Rebuild the typed error for a reply's code (unknown codes become InternalError)."""
    details = dict(details or {})
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return InternalError(f"{code}: {message}", **details)
    if cls is Overloaded:
        retry = int(details.pop("retry_after_ms", 100))
        return Overloaded(message, retry_after_ms=retry, **details)
    return cls(message, **details)
