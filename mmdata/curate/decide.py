"""Per-sample decisions, in a fixed order over the samples still kept: measure errors (``failed``),
filters (``filter:<name>``), decontamination (``decontaminate:<eval key>``), then deduplication —
exact, perceptual, semantic per modality (``duplicate:<method>:<kept key>``).

A duplicate's kept key is resolved to the sample that stays in the curated build: when the sample
kept for it is removed by a later method, the ledger names the one kept for that, and so on.

The state lives on disk, one part per input shard (``mmdata.curate.parts``), and every step is a
round of engine tasks over the shards (or over hash buckets and clusters), driven by
``mmdata.curate.stages``. The driver holds per-shard counts and offsets and a few fixed-size
aggregates (the CLIP-score histograms), never a per-sample array.
"""

SCORE_COLUMNS = ("clip_score", "language", "language_score", "words", "tokens", "speech_ratio", "loudness", "clipping",
                 "phash", "duplicate_of", "duplicate_score", "decontaminate_cosine")
