"""The one base class of every error lightclip raises on purpose.

A :class:`LightclipError` is a problem the user can fix (bad params, a bad catalogue, a stale
output, a failed gate): the CLI prints its message without a traceback and exits non-zero.
Anything else reaching the CLI is a bug and keeps its traceback. Subclasses that were
``ValueError``/``RuntimeError`` before keep that base too, so callers catching those still work.
"""

from __future__ import annotations


class LightclipError(Exception):
    """A user-fixable error; the message names the file, key, row or field and what is wrong."""
