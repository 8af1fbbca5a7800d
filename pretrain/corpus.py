"""The corpus in one import: where it comes from (sources), how it is read (readers), cleaned (cleaning)
and near-deduplicated (dedup). Kept so that `from .corpus import resolve_sources, source_identity` works."""

from .cleaning import Cleaner, CleanDocument, StreamNormalizer, holdout_fraction, normalize, safe_chunks, text_digest
from .corpus_report import REASONS, SourceReport
from .dedup import NearDuplicateIndex, lsh_bands
from .readers import Document, read_source, txt_unit
from .sources import FILE_TYPES, Source, resolve_sources, source_identity

__all__ = ["Cleaner", "CleanDocument", "Document", "FILE_TYPES", "NearDuplicateIndex", "REASONS", "Source",
           "SourceReport", "StreamNormalizer", "holdout_fraction", "lsh_bands", "normalize", "read_source",
           "resolve_sources", "safe_chunks", "source_identity", "text_digest", "txt_unit"]
