"""The ``validate`` stage: one Great Expectations suite over the catalogue and its images.

The catalogue table is extended with derived columns (normalised title, image facts from
:func:`inspect_images`, cross-split flags) and a single GX 1.x suite runs on that frame. Every
expectation carries a stable check name (``meta["check"]``) so results map back to checks,
and the ``COMPLETE`` result format with a ``_row`` index column gives the exact failing rows.

Checks (severity ``error`` unless noted):

=====================  ==========================================  ===========================
check                  GX expectation                              what it means
=====================  ==========================================  ===========================
id_not_null            expect_column_values_to_not_be_null         id is missing or blank
id_unique              expect_column_values_to_be_unique           id used by 2+ rows
title_not_empty        expect_column_values_to_not_be_null         title missing/blank
title_length           expect_column_value_lengths_to_be_between   stripped title too short/long
title_not_placeholder  expect_column_values_to_not_be_in_set       "N/A", "none", "tbd", ...
attribute_in_set:COL   expect_column_values_to_be_in_set           unseen value (non-null only): a WARNING
                                                                   unless validate.unseen_values says otherwise
year_in_range          expect_column_values_to_be_between          year outside the bounds
catalogue_not_empty    (none: checked before the suite runs)       the catalogue has no rows
image_exists           expect_column_values_to_be_in_set           image file missing
image_too_large        expect_column_values_to_be_in_set           width x height > max_image_pixels
image_decodes          expect_column_values_to_be_in_set           PIL cannot decode the file
image_min_size         expect_column_values_to_be_between          shorter side too small
image_duplicate        expect_column_values_to_be_unique           WARNING: same bytes, same split
split_value            expect_column_values_to_be_in_set           split not null/train/val/test
cross_split_id         expect_column_values_to_be_in_set           id in two different splits
cross_split_image      expect_column_values_to_be_in_set           same bytes in two splits
=====================  ==========================================  ===========================

Only the first failing image check fires for a row (a missing file is not also reported as
undecodable or too small; an undecodable one not as too small; a too large one is never
decoded: its size comes from the header), and an empty title is not also reported as too short
or a placeholder, so each row's reasons stay readable. An empty catalogue fails: there is
nothing to validate, and nothing downstream could use it; so does a quarantine that leaves no
clean row.

One module per part: ``common``, ``images``, ``results``, ``suite`` and ``stage``; every public
name is re-exported here.
"""

from __future__ import annotations

from lightclip.validation.common import (  # noqa: F401 (re-exported)
    ATTRIBUTE_CHECK,
    ERROR,
    IMAGE_COLUMNS,
    MAX_EXAMPLES,
    QUARANTINE_FILE,
    ROW_COLUMN,
    WARNING,
    plain_value,
    value_counts_text,
)
from lightclip.validation.images import (  # noqa: F401 (re-exported)
    inspect_images,
)
from lightclip.validation.results import (  # noqa: F401 (re-exported)
    CheckResult,
    ValidationFailed,
    ValidationResult,
)
from lightclip.validation.suite import (  # noqa: F401 (re-exported)
    build_frame,
    validate_catalogue,
)
from lightclip.validation.stage import (  # noqa: F401 (re-exported)
    ValidateInputs,
    ValidateOutputs,
    ValidationSummary,
    render_report,
    run_validation,
)
