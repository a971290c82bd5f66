"""User-facing errors: one line naming the key or file and the fix; exit code 2."""
from __future__ import annotations

from pathlib import Path

import re

USER_ERROR_EXIT = 2


def one_line(text: str) -> str:
    """Join the non-blank lines of `text` with single spaces (error output is always one line)."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, ...). Printed as one line, no traceback.

    `key` is the config key (or command-line argument) to change, e.g. "data.root"; it prefixes the message.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        message = one_line(message)
        super().__init__(f"{key}: {message}" if key else message)


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving last.pt.

    A KeyboardInterrupt (not an Exception), so it ends a whole sweep and passes job runners untouched.
    """

    def __init__(self, signum: int, checkpoint: "Path | None", run_dir: "Path") -> None:
        import signal

        self.signum, self.checkpoint, self.run_dir = signum, checkpoint, run_dir
        saved = f"saved {checkpoint}" if checkpoint else "checkpoints are off, nothing saved"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {saved}; continue with: "
                         f"nnctl train resume={run_dir}")


class TrialPruned(Exception):
    """Raised by an epoch hook to stop a search trial whose metric is not promising (`nnctl tune`'s pruner).

    The run stops after the epoch's checkpoints were written; the tuner records the trial as pruned."""

    def __init__(self, epoch: int, value: float) -> None:
        self.epoch, self.value = epoch, value
        super().__init__(f"pruned after epoch {epoch} (metric {value:.4g})")
