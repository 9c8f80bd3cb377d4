"""Catalogue data: the one catalogue model, its importers, exporters and the synthetic default."""

from lightclip.data.catalogue import (
    CATALOGUE_FILE,
    COLUMNS,
    SPLITS,
    Catalogue,
    CatalogueError,
    ImportReport,
    SkippedRow,
)

__all__ = ["CATALOGUE_FILE", "COLUMNS", "SPLITS", "Catalogue", "CatalogueError", "ImportReport", "SkippedRow"]
