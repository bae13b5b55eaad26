"""clean_caption skips ftfy for printable-ASCII captions without '&': the result must be exactly what
ftfy's path gives, on random captions over that alphabet and on the near misses that must take ftfy."""
import random
import string

import ftfy

from mmdata.transforms.text import _PLAIN, clean_caption

PLAIN = "".join(c for c in string.printable if c not in "&\x0b\x0c")  # printable ASCII, tab, CR, LF, space


def by_ftfy(text: str) -> str:
    return " ".join(ftfy.fix_text(text).split())


def test_plain_captions_match_ftfy_exactly():
    rng = random.Random(0)
    words = ["a", "cat", "on", "<b>", "lt;", "#39;", "x;y", "  ", "\r\n", "\t", "'quoted'", '"q"', "--", "...", "`"]
    for _ in range(3000):
        text = "".join(rng.choice(PLAIN) if rng.random() < 0.5 else rng.choice(words) for _ in range(rng.randint(0, 40)))
        assert _PLAIN.fullmatch(text), repr(text)
        assert clean_caption(text, 4096)[0] == by_ftfy(text), repr(text)


def test_near_misses_go_through_ftfy():
    for text in ["fish &amp; chips", "caf\u00e9", "cafÃ©", "a\x1fb", "bell\x07", "del\x7f", "esc\x1b[31mred",
                 "\ufeffbom", "ﬁne", "ＡＢＣ", "tab\x0bvt", "form\x0cfeed"]:
        assert not _PLAIN.fullmatch(text), repr(text)
        assert clean_caption(text, 4096)[0] == by_ftfy(text)
    assert clean_caption("fish &amp; chips", 4096)[0] == "fish & chips"  # the entity is still repaired
    assert clean_caption("cafÃ©", 4096)[0] == "café"  # and mojibake
    assert clean_caption("a" * 50, 10) == ("a" * 10, ["text_truncated"])
