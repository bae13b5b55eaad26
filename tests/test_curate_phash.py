"""Perceptual-hash dedup by multi-index hashing gives exactly what the all-pairs search gives
(planted near pairs, chains, identical groups, hashes just beyond the threshold), split over many
engine tasks, and a degenerate bucket (thousands of identical or near-identical hashes) costs no
quadratic work."""
import numpy as np
import pytest

from mmdata.curate import phash
from mmdata.curate.features import phash_bytes
from mmdata.curate.phash import bands, near_duplicates
from mmdata.storage import OutputDir


def all_pairs(codes, t):
    """The rule as the all-pairs FAISS range search applies it: j is a duplicate of the i < j within
    t with the lowest (distance, i)."""
    import faiss

    index = faiss.IndexBinaryFlat(64)
    x = phash_bytes(codes)
    index.add(x)
    lims, dist, labels = index.range_search(x, t + 1)
    dup, kept, d = [], [], []
    for j in range(len(codes)):
        better = [(int(a), int(i)) for a, i in zip(dist[lims[j]:lims[j + 1]], labels[lims[j]:lims[j + 1]]) if i < j]
        if better:
            a, i = min(better)
            dup.append(j), kept.append(i), d.append(a)
    return np.asarray(dup, np.int64), np.asarray(kept, np.int64), np.asarray(d, np.int64)


def flip(h, bits):
    for b in bits:
        h ^= 1 << int(b)
    return h


def planted(n, t, seed):
    """Random hashes plus near copies (≤ t bits off), chains A~B~C with A beyond t of C, identical
    copies and copies t + 1 bits off; shuffled, so a copy may rank before its source."""
    rng = np.random.default_rng(seed)
    base = [int(v) for v in rng.integers(0, 2**63, n, dtype=np.int64)]
    out = list(base)
    for h in base[: n // 4]:
        out.append(flip(h, rng.choice(64, int(rng.integers(1, t + 1)) if t else 0, replace=False)))
    for h in base[n // 4: n // 2]:  # chain: b is h with k bits off, c is b with k other bits off
        k = max(1, (t + 2) // 2)
        bits = rng.choice(64, 2 * k, replace=False)
        b = flip(h, bits[:k])
        out += [b, flip(b, bits[k:])]
    for h in base[n // 2: n // 2 + n // 8]:
        out += [h, h]
    for h in base[-n // 8:]:
        out.append(flip(h, rng.choice(64, t + 1, replace=False)))
    out = np.asarray([v - (1 << 64) if v >= 1 << 63 else v for v in out], dtype=np.int64)
    return out[rng.permutation(len(out))]


@pytest.mark.parametrize("t", [0, 1, 3, 8, 12])
def test_same_result_as_all_pairs(tmp_path, monkeypatch, t):
    monkeypatch.setattr(phash, "TASK_ROWS", 700)  # many task files, buckets never split
    monkeypatch.setattr(phash, "TILE", 64)  # many tiles per bucket
    codes = planted(1200, t, seed=t)
    dup, kept, dist, stats = near_duplicates(codes, t, out=OutputDir(str(tmp_path)), folder="scratch")
    want = all_pairs(codes, t)
    assert len(want[0]) > 300  # the planted ones at least
    for got, expected in zip((dup, kept, dist), want):
        np.testing.assert_array_equal(got, expected)
    assert t == 0 or stats["tasks"] > 1
    assert not (tmp_path / "scratch").exists()


def test_chain_keeps_the_rule(tmp_path):
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = flip(a, range(5))  # 5 from a
    c = flip(b, range(40, 45))  # 5 from b, 10 from a
    codes = np.asarray([a, b, c, 0x7000_0000_0000_0000], dtype=np.int64)
    dup, kept, dist, _ = near_duplicates(codes, 8, out=OutputDir(str(tmp_path)), folder="s")
    # c's best better-ranked hash within 8 is b (a is 10 away); b is a duplicate of a
    assert (dup.tolist(), kept.tolist(), dist.tolist()) == ([1, 2], [0, 1], [5, 5])


def test_bands_cover_the_64_bits_once():
    for t in range(33):
        spec = bands(t)
        assert len(spec) == t + 1
        mask = 0
        for shift, width in spec:
            band = ((1 << width) - 1) << shift
            assert mask & band == 0
            mask |= band
        assert mask == 2**64 - 1


def test_degenerate_buckets_are_not_quadratic(tmp_path):
    # 3,000 blank images (all-zero hashes) and 200 near-blank ones (a few low bits set): the identical
    # ones are collapsed before any comparison; only the 200 distinct near-blank hashes meet in buckets
    rng = np.random.default_rng(0)
    near = np.unique(rng.integers(1, 2**12, 400))[:200]
    codes = np.concatenate([np.zeros(3000, np.int64), near.astype(np.int64)])
    codes = codes[rng.permutation(len(codes))]
    dup, kept, dist, stats = near_duplicates(codes, 8, out=OutputDir(str(tmp_path)), folder="s")
    for got, expected in zip((dup, kept, dist), all_pairs(codes, 8)):
        np.testing.assert_array_equal(got, expected)
    assert stats["distinct"] == 201
    assert stats["pairs"] <= 201 * 200 // 2  # each pair once (in the first band it agrees on), not 3,200^2 / 2


def test_many_identical_hashes(tmp_path):
    codes = np.zeros(200_000, np.int64)
    codes[::1000] = -1  # all ones: 64 bits from zero
    dup, kept, dist, stats = near_duplicates(codes, 8, out=OutputDir(str(tmp_path)), folder="s")
    assert stats["pairs"] == 0 and len(dup) == len(codes) - 2  # zero and all-ones share no band
    assert set(kept.tolist()) == {0, 1} and not dist.any()


def test_small_inputs(tmp_path):
    out = OutputDir(str(tmp_path))
    for codes in ([], [5]):
        assert all(len(a) == 0 for a in near_duplicates(np.asarray(codes, np.int64), 8, out=out, folder="s")[:3])
    dup, kept, dist, _ = near_duplicates(np.asarray([5, 5], np.int64), 0, out=out, folder="s")
    assert (dup.tolist(), kept.tolist(), dist.tolist()) == ([1], [0], [0])


def test_real_photos_same_as_all_pairs(tmp_path):
    # pHashes of the demo photos and of re-encoded, resized, cropped and darkened copies
    import io

    from PIL import ImageEnhance

    from mmdata.curate.features import phash64
    from pipelines.demo_corpus import PHOTOS, skimage_photo

    def enc(im, q=90):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=q)
        return buf.getvalue()

    codes = []
    for name in sorted(PHOTOS):
        im = skimage_photo(name).convert("RGB")
        w, h = im.size
        for variant in (im, im.resize((w // 2, h // 2)), im.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
                        ImageEnhance.Brightness(im).enhance(0.6)):
            codes.append(phash64(enc(variant, 40 if variant is im else 90)))
    codes = np.asarray(codes, np.int64)
    for t in (4, 8, 16):
        got = near_duplicates(codes, t, out=OutputDir(str(tmp_path)), folder="s")
        want = all_pairs(codes, t)
        assert len(want[0]) >= len(PHOTOS)
        for a, b in zip(got[:3], want):
            np.testing.assert_array_equal(a, b)
