"""Exact-duplicate grouping by hash bucket on the engine gives what one dictionary over the corpus gives:
each group's best-ranked candidate kept, the others named duplicates of it, non-candidates ignored,
whatever the number of buckets."""
import numpy as np
import pytest

from mmdata.curate.exact import digest_rows, exact_round
from mmdata.curate.vectors import save_npy
from mmdata.storage import OutputDir


def reference(values, rank):
    groups = {}
    for p, v in enumerate(values):
        if v and rank[p] >= 0:
            groups.setdefault(v, []).append(p)
    dup, kept = [], []
    for members in groups.values():
        members.sort(key=lambda p: rank[p])
        dup += members[1:]
        kept += [members[0]] * (len(members) - 1)
    o = np.argsort(dup, kind="stable")
    return np.asarray(dup, np.int64)[o], np.asarray(kept, np.int64)[o]


@pytest.mark.parametrize("buckets", [1, 3, 16])
def test_buckets_give_the_dictionary_result(tmp_path, buckets):
    rng = np.random.default_rng(buckets)
    n, shards = 3000, ["00000", "00001", "00002", "00003"]
    values = [f"{v:064x}" if v else None for v in rng.integers(0, 900, n)]  # many repeats; 0: no value
    values[5] = ""  # an empty value takes no part
    rank = rng.permutation(n).astype(np.int64)
    rank[rng.random(n) < 0.2] = -1  # not candidates (filtered earlier, or augmented views)
    out = OutputDir(str(tmp_path))
    cuts = [0, 700, 700, 2100, n]  # one shard without rows
    save_npy(out, "s/offsets.npy", np.asarray(cuts, np.int64))
    for i, name in enumerate(shards):
        pos = list(range(cuts[i + 1] - cuts[i]))
        save_npy(out, f"s/text/{name}.npy", digest_rows(pos, values[cuts[i]:cuts[i + 1]], buckets))
    dup, kept = exact_round(out, "s", "text", rank, shards, buckets)
    want = reference(values, rank)
    assert len(want[0]) > 1000
    np.testing.assert_array_equal(dup, want[0])
    np.testing.assert_array_equal(kept, want[1])
