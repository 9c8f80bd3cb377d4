"""Title folding: when two product titles count as the same title.

One rule for the two places that compare titles: the split's leakage groups (items with the same
title never straddle train and test, :mod:`lightclip.data.split`) and the evaluation's positives
(items with the same title are interchangeable answers, :func:`lightclip.evaluation.title_groups`).
Torch-free, so the data stages can import it without the model stack.
"""

from __future__ import annotations


def fold_title(title: str) -> str:
    """``title`` lower-cased, with every run of whitespace one space and none at the ends.

    Two titles are the same title when their folds are equal. Whitespace is Unicode whitespace
    (``str.isspace``: tabs, newlines, no-break spaces ...). A blank title folds to ``""``; what
    a missing or blank title means is the caller's rule (the split does not group them, the
    evaluation's positives do group blank ones).
    """
    return " ".join(title.split()).lower()
