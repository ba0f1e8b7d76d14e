"""The edit store's errors, and the argument checks that raise them.

A module of its own so that the store's helpers (`fsutil`, `store_export`) can raise them without
importing `store`; `sola_vllm.store` re-exports both errors.
"""

from __future__ import annotations

from .edit import validate_id


class StoreError(Exception):
    """A store operation failed; the message names the path, id or fingerprints involved."""


class TransitionError(StoreError):
    """The edit's lifecycle state does not allow this transition; `state` is the current one."""

    def __init__(self, message: str, state: str):
        super().__init__(message)
        self.state = state


class UnknownEditError(StoreError, KeyError):
    """No edit with this id was ever added to the store."""

    def __str__(self) -> str:  # KeyError would print the message repr-quoted
        return str(self.args[0])


def _check_id(edit_id: object) -> str:
    try:
        return validate_id(edit_id)
    except ValueError as exc:
        raise StoreError(str(exc)) from None


def _check_text(author: object, note: object) -> None:
    for name, value in (("author", author), ("note", note)):
        if not isinstance(value, str):
            raise StoreError(f"{name} must be a string, got {value!r}")
