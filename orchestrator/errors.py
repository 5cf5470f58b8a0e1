"""Refusals of the control plane. Each says what was wrong; none changes state."""
from __future__ import annotations


class ControlError(Exception):
    """A request refused; nothing was changed."""

    code = "error"


class NotFoundError(ControlError):
    code = "not_found"


class BadRequestError(ControlError):
    code = "bad_request"


class VersionConflictError(ControlError):
    """A compare-and-swap lost: the record is not at the expected version."""

    code = "version_conflict"

    def __init__(self, what: str, expected: int, current: int) -> None:
        super().__init__(f"{what}: expected version {expected}, current version {current}")
        self.expected, self.current = expected, current
