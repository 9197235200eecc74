"""The one exception type of approxtune's bad-input errors.

Every problem a user can fix — a malformed study, a model or data that does not fit, a cache of other settings, an
export that cannot be made — raises a subclass of :class:`ApproxtuneError` whose message is one line naming the
problem and the fix.  The command line prints that line and exits with code 2; the Python API raises it as it is,
so ``except approxtune.ApproxtuneError`` catches every such error and nothing else.
"""

from __future__ import annotations

__all__ = ["ApproxtuneError"]


class ApproxtuneError(ValueError):
    """Bad input: the message names the problem and the fix."""
