import re

import pytest

from mmdata.errors import SampleFailed
from mmdata.keys import MAX_KEY_LEN, key_to_id, sanitize_key, unique_keys
from mmdata.transforms.text import clean_caption, decode_text

SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def test_keys_are_tar_safe_bounded_and_stable():
    raws = ["a/cat", "a/cat.v2", "ünïcødé/名前", "x" * 400, "", "a b/c"]
    keys = unique_keys(raws)
    assert all(SAFE.match(k) and len(k) <= MAX_KEY_LEN for k in keys)
    assert keys == unique_keys(list(reversed(raws)))[::-1]
    assert keys[0] == "a_cat" and keys[1] == "a_cat_v2"


def test_collisions_resolved_deterministically_whatever_the_order():
    raws = ["a/cat", "a_cat", "a-cat", "a.cat"]
    keys = unique_keys(raws)
    assert len(set(keys)) == 4
    assert dict(zip(raws, keys)) == dict(zip(raws[::-1], unique_keys(raws[::-1])))
    assert "a_cat" in keys


def test_ids_are_signed_64_bit_and_stable():
    ids = {key_to_id(f"k{i}") for i in range(5000)}
    assert len(ids) == 5000
    assert all(-(2**63) <= i < 2**63 and i != -1 for i in ids)
    assert key_to_id("a_cat") == key_to_id("a_cat")
    assert sanitize_key("x" * 300) == sanitize_key("x" * 300)


def test_text_decoding_fallbacks_are_recorded():
    assert decode_text("café".encode()) == ("café", [])
    assert decode_text("\ufeffbom".encode("utf-8")) == ("bom", [])
    assert decode_text("café".encode("cp1252")) == ("café", ["text_encoding:cp1252"])
    text, warnings = decode_text("hello".encode("utf-16"))
    assert text == "hello" and warnings == ["text_encoding:utf-16"]
    with pytest.raises(SampleFailed, match="decode:text"):
        decode_text(bytes(range(32)) * 10)


def test_caption_cleaning():
    assert clean_caption("  a\n\tcat   on a  mat ", 100) == ("a cat on a mat", [])
    assert clean_caption("schÃ¶n", 100)[0] == "schön"  # mojibake repaired by ftfy
    assert clean_caption("abcdef", 3) == ("abc", ["text_truncated"])
