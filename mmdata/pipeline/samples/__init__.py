"""One record or unit's samples: the sample type, the per-record step, audio segments, views, embedders."""
