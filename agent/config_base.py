"""What every configuration class shares: strictness, the keys its input set, and the
errors the loader raises.

Plug-ins (sources, sinks) declare their own config classes on this base, in their own
module, so adding a source is one file; `config.py` builds the unions from them.
The classes are msgspec Structs (pydantic cost the daemon ~10 MB of RSS);
`config_build.build` turns plain data into them with every problem reported.
"""
from __future__ import annotations

import re
from typing import Annotated

import msgspec

# The stream-id rule, defined once: config ids, ids taken from MQTT topic levels and
# the HTTP API's stream names all follow it.
STREAM_ID_CHARS = r"[A-Za-z0-9_.\-]"
# at most this long: an id names the stream's baseline file (a file name holds 255 bytes),
# and every alert id, health entry and topic that carries it
STREAM_ID_MAX = 128
# \Z, not $: "$" also matches before a final newline, and "x\n" would be a second stream
STREAM_ID_PATTERN = rf"^{STREAM_ID_CHARS}{{1,{STREAM_ID_MAX}}}\Z"
STREAM_ID_RE = re.compile(STREAM_ID_PATTERN)   # for ids from topics and payloads
StreamId = Annotated[str, msgspec.Meta(
    pattern=STREAM_ID_PATTERN,
    description=f"a name of 1-{STREAM_ID_MAX} letters, digits, '_', '.' and '-'")]


class ConfigError(ValueError):
    """A configuration file that cannot be used; `str()` lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class KeyProblem(ValueError):
    """What a config class's `__post_init__` raises about one of its keys: the problem is
    reported on that key, with its value, not on the whole section."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


# Unknown keys are errors (a typo must not silently fall back to a default).  `dict`
# gives each instance room for the keys its input mapping set (`keys_set`).
class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, dict=True):
    pass


class SourceConfig(Strict, tag_field="type"):
    """A source plug-in's config class: its `tag` is the `source.type` that selects it."""

    @property
    def type(self) -> str:
        return self.__struct_config__.tag


def keys_set(cfg: Strict) -> frozenset[str]:
    """The keys of `cfg` that its input mapping gave (so that, per key, a value the user
    wrote can win over another default); none for a config built in code."""
    return cfg.__dict__.get("keys_set", frozenset())


# The common constraints, named once (msgspec checks them; config_build words them).
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
