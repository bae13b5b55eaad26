"""The three kinds of failure mmdata distinguishes.

* ``UserError``: the job cannot start (bad path, bad config, unreachable cluster). The CLI prints
  one line and exits 2.
* ``SampleFailed``: one input could not be read or decoded. The record ends ``failed`` with
  ``reason``; the run goes on.
* ``SampleFiltered``: one input was read but a policy excludes it (too small, missing modality).
  The record ends ``filtered`` with ``reason``.

Reasons are short machine-readable strings, ``<what>:<detail>`` (``decode:image``,
``missing:text``, ``min_side``), so reports can group by them.
"""


class UserError(Exception):
    """A problem the user must fix before the job can run (exit code 2)."""


class SampleError(Exception):
    """Base of per-sample outcomes that are not 'written'."""

    status = "failed"

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SampleFailed(SampleError):
    """The input is broken: unreadable, truncated, undecodable."""

    status = "failed"


class SampleFiltered(SampleError):
    """The input is fine but a configured policy excludes it."""

    status = "filtered"
