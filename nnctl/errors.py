"""User-facing errors: one line naming the key or file and the fix; exit code 2."""
from __future__ import annotations

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, ...). Printed as one line, no traceback."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
