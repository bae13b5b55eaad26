"""Caption ops for CLIP-style training: pick one of a sample's captions, wrap it in a template.

Text flows through the ops as a list of captions (one string is a list of one); the result is the
first caption left, so without ``choose_caption`` a sample with several captions uses its first.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field

from mmdata.augment.base import Op


class TextOp(Op):
    modality = "text"


class ChooseCaption(TextOp):
    """Pick one of the sample's captions, uniformly."""

    op: Literal["choose_caption"]

    def draw(self, rng: np.random.Generator, captions: list[str]) -> dict:
        return {"index": int(rng.integers(0, len(captions))) if captions else 0}

    def apply(self, captions: list[str], params: dict) -> list[str]:
        return captions[params["index"]:params["index"] + 1]


def _template(value: str) -> str:
    if value.count("{}") != 1:
        raise ValueError(f"template {value!r} must contain '{{}}' exactly once (where the caption goes)")
    try:
        value.format("")
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"template {value!r} has braces other than one '{{}}'; write literal braces as '{{{{' '}}}}'") from None
    return value


class Template(TextOp):
    """Wrap the caption in a template drawn uniformly from ``templates`` (``"a photo of {}"``)."""

    op: Literal["template"]
    templates: list[Annotated[str, AfterValidator(_template)]] = Field(min_length=1)

    def draw(self, rng: np.random.Generator, captions: list[str]) -> dict:
        i = int(rng.integers(0, len(self.templates)))
        return {"index": i, "template": self.templates[i]}

    def apply(self, captions: list[str], params: dict) -> list[str]:
        return [params["template"].format(c) for c in captions]


TEXT_OPS: dict[str, type[TextOp]] = {cls.model_fields["op"].annotation.__args__[0]: cls for cls in (ChooseCaption, Template)}
