"""The augmentation config: YAML (or a mapping) → validated, ordered op lists per modality.

::

    seed: 0          # default seed (calls may pass their own)
    views: 2         # offline: augmented views written per sample (<key>_v01 …); 0 = none
    image: [{op: random_resized_crop, p: 1.0, scale: [0.5, 1.0]}, {op: horizontal_flip, p: 0.5}]
    audio: [{op: gain, p: 1.0, min_db: -6, max_db: 6}]
    mel:   [{op: time_mask, p: 0.5, max_width: 40}]
    text:  [{op: template, p: 1.0, templates: ["a photo of {}", "{}"]}]

An unknown section, op or parameter names itself and lists the valid ones; a bad value names the
op and the field. :func:`load_augment_config` turns every problem into a one-line ``UserError``;
:class:`AugmentConfig` also nests in a larger pydantic config (the errors then carry its path).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmdata.augment.audio_ops import AUDIO_OPS, AudioOp
from mmdata.augment.base import Op
from mmdata.augment.image_ops import IMAGE_OPS, ImageOp
from mmdata.augment.mel_ops import MEL_OPS, MelOp
from mmdata.augment.text_ops import TEXT_OPS, TextOp
from mmdata.errors import UserError

OPS: dict[str, dict[str, type[Op]]] = {"image": IMAGE_OPS, "audio": AUDIO_OPS, "mel": MEL_OPS, "text": TEXT_OPS}
MODALITIES = tuple(OPS)


def _fail(message: str):
    # the message goes in the context: a template such as "a photo of {}" must not be formatted
    raise PydanticCustomError("augment_config", "{message}", {"message": message})


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    # field names and list positions; pydantic's union-member tags ("constrained-int") are noise here
    where = ".".join(str(p) for p in e["loc"] if isinstance(p, int) or str(p).isidentifier())
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_ops(modality: str, items: Any) -> tuple[Op, ...]:
    """Validate one modality's list of ``{op: name, p: …, <params>}`` mappings into op objects."""
    registry = OPS[modality]
    valid_ops = ", ".join(sorted(registry))
    if items is None:
        return ()
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        _fail(f"must be a list of ops like {{op: name, p: 0.5, ...}}; valid {modality} ops: {valid_ops}")
    ops = []
    for i, item in enumerate(items):
        if isinstance(item, Op) and type(item) in registry.values():
            ops.append(item)
            continue
        if not isinstance(item, Mapping):
            _fail(f"item {i}: expected a mapping like {{op: name, p: 0.5, ...}}, got {type(item).__name__}")
        name = item.get("op")
        if name is None:
            _fail(f"item {i}: no 'op'; valid {modality} ops: {valid_ops}")
        if not isinstance(name, str) or name not in registry:
            home = next((m for m, reg in OPS.items() if isinstance(name, str) and name in reg), None)
            _fail(f"item {i}: {name!r} is a {home} op: list it under {home}" if home
                  else f"item {i}: unknown op {name!r}; valid {modality} ops: {valid_ops}")
        cls = registry[name]
        params = [f for f in cls.model_fields if f != "op"]
        unknown = sorted(str(k) for k in item if k not in cls.model_fields)
        if unknown:
            _fail(f"item {i} ({name}): unknown parameter{'s' if len(unknown) > 1 else ''} "
                  f"{', '.join(map(repr, unknown))}; valid: {', '.join(params)}")
        try:
            ops.append(cls.model_validate(dict(item)))
        except ValidationError as exc:
            _fail(f"item {i} ({name}): {_first_error(exc)}")
    return tuple(ops)


class AugmentConfig(BaseModel):
    """Ops per modality, applied in list order; ``seed`` and ``views`` for offline views."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="default seed; Augmenter calls may pass their own")
    views: int = Field(0, ge=0, le=99, description="offline: augmented views per sample, written as <key>_v01 …")
    image: tuple[SerializeAsAny[ImageOp], ...] = ()
    audio: tuple[SerializeAsAny[AudioOp], ...] = ()
    mel: tuple[SerializeAsAny[MelOp], ...] = ()
    text: tuple[SerializeAsAny[TextOp], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_sections(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                _fail(f"unknown section{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                      f"valid: {', '.join(cls.model_fields)}")
        return data

    @field_validator(*MODALITIES, mode="before")
    @classmethod
    def _parse_ops(cls, value: Any, info) -> tuple[Op, ...]:
        return parse_ops(info.field_name, value)


def load_augment_config(source: Union["AugmentConfig", Mapping, str, os.PathLike, None]) -> AugmentConfig:
    """An :class:`AugmentConfig` from itself, a mapping, or a YAML file path (a top-level ``augment:``
    mapping is unwrapped, so a build config's section works too). Problems raise a one-line UserError."""
    if isinstance(source, AugmentConfig):
        return source
    if source is None:
        return AugmentConfig()
    if isinstance(source, (str, os.PathLike)):
        import yaml  # here: a worker process, which gets its config pickled, need not import it

        try:
            with open(source, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise UserError(f"cannot read augment config {source}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"augment config {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
        source = {} if data is None else data
    if not isinstance(source, Mapping):
        raise UserError(f"augment config must be a mapping of modality: [ops], got {type(source).__name__}")
    if set(source) == {"augment"} and isinstance(source["augment"], Mapping):
        source = source["augment"]
    try:
        return AugmentConfig.model_validate(source)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UserError(f"bad augment config: {'augment.' + where + ': ' if where else ''}{e['msg']}".replace("\n", " ")) from None
