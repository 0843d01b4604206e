"""Config classes built from plain data (a YAML document, a model's policy, CLI flags),
with every problem found, not only the first.

msgspec checks a value against its field's type and constraints (`Meta`) but stops at
the first error, so the mapping is walked here key by key and msgspec checks each leaf
value: independent mistakes are all reported, each with the key path as the user wrote
it, the value (bounded, secrets hidden) and what was expected.  Also here, for every
config class: a section given as null means its defaults, inf and nan are no number
anywhere, and each struct remembers the keys its mapping gave (`config_base.keys_set`).
"""
from __future__ import annotations

import math
import re
import reprlib
import types
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from .config_base import ConfigError, KeyProblem

KeyPath = tuple   # keys and list indices, as the user wrote them


class Invalid(ConfigError):
    """Data that does not build the class; `found` holds (key path, problem) pairs."""

    def __init__(self, found: list[tuple[KeyPath, str]]):
        self.found = found
        super().__init__([f"{fmt_path(p)}: {text}" for p, text in found])


def build(cls: type, data: Any):
    """An instance of the config class `cls` from `data`; Invalid listing every problem."""
    found: list[tuple[KeyPath, str]] = []
    out = _build(cls, data, (), found)
    if found:
        raise Invalid(found)
    return out


_BAD = object()   # a value that did not build (its problems are in `found`)
_UNIONS = (Union, types.UnionType)


def _unwrap(tp) -> tuple[Any, list[msgspec.Meta]]:
    """The type under Annotated, and its msgspec constraints."""
    metas: list[msgspec.Meta] = []
    while hasattr(tp, "__metadata__"):
        metas += [m for m in tp.__metadata__ if isinstance(m, msgspec.Meta)]
        tp = tp.__origin__
    return tp, metas


def _is_struct(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


@lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(cls)}


def _build(tp, value, path: KeyPath, found: list) -> Any:
    base, _ = _unwrap(tp)
    if _is_struct(base):
        return _struct(base, value, path, found)
    if get_origin(base) in _UNIONS:
        args = get_args(base)
        structs = [a for a in args if _is_struct(a)]
        if structs and all(_is_struct(a) or a is type(None) for a in args):
            if value is None and type(None) in args:
                return None
            if len(structs) > 1:
                return _tagged(structs, value, path, found)
            return _struct(structs[0], value, path, found)
    if get_origin(base) is list and isinstance(value, list):
        n = len(found)
        items = [_build(get_args(base)[0], v, path + (i,), found) for i, v in enumerate(value)]
        # the list's own constraints (a minimum length) once its items built
        return _BAD if len(found) > n else _leaf(tp, items, path, found, shown=value)
    return _leaf(tp, value, path, found)


def _leaf(tp, value, path: KeyPath, found: list, shown: Any = None) -> Any:
    shown = value if shown is None else shown
    try:
        # not strict: a quoted number ("1883") or a whole float (2.0) is read as the number
        # it says, as pydantic did; msgspec then checks its type and range
        out = msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError:
        out = _BAD
    if _non_finite(value) or _non_finite(out):     # a quoted "inf" too
        expected = "a finite number"
    elif out is _BAD:
        expected = describe(tp)
    else:
        return out
    found.append((path, f"value {show(shown, _key(path))} is invalid: expected {expected}"))
    return _BAD


def _non_finite(x) -> bool:
    return isinstance(x, float) and not math.isfinite(x)


def _struct(cls: type, value, path: KeyPath, found: list, tag: str | None = None) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        found.append((path, f"value {show(value, _key(path))} is invalid: expected a mapping"))
        return _BAD
    n = len(found)
    fields = _fields(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in value:
            if f.required:
                found.append((path + (name,), "required key is missing"))
            continue
        v = value[name]
        if v is None and not f.required and _is_struct(f.type):
            v = {}    # a section whose keys are all commented out: all its defaults
        kwargs[name] = _build(f.type, v, path + (name,), found)
    for key, v in value.items():
        if key not in fields and key != tag:
            found.append((path + (key,), _unknown(key, v, path)))
    if len(found) > n:
        return _BAD
    try:
        out = cls(**kwargs)
    except KeyProblem as e:
        found.append((path + (e.key,), f"value {show(value.get(e.key), e.key)} is invalid: {e}"))
        return _BAD
    except (ValueError, TypeError) as e:
        found.append((path, f"value {show(value, _key(path))} is invalid: {e}"))
        return _BAD
    out.__dict__["keys_set"] = frozenset(kwargs)
    return out


def _tagged(classes: list[type], value, path: KeyPath, found: list) -> Any:
    """One of several structs, told apart by their tag key (a source's `type`)."""
    if isinstance(value, tuple(classes)):
        return value
    if not isinstance(value, dict):
        found.append((path, f"value {show(value, _key(path))} is invalid: expected a mapping"))
        return _BAD
    field = classes[0].__struct_config__.tag_field
    tags = {c.__struct_config__.tag: c for c in classes}
    choices = ", ".join(repr(t) for t in sorted(tags))
    if field not in value:
        found.append((path + (field,), f"required key is missing (it selects the kind: one of "
                                       f"{choices})"))
        return _BAD
    tag = value[field]
    if not isinstance(tag, str) or tag not in tags:
        found.append((path + (field,), f"value {show(tag)} is invalid: expected one of "
                                       f"{choices}"))
        return _BAD
    return _struct(tags[tag], value, path, found, tag=field)


def _unknown(key, value, path: KeyPath) -> str:
    if is_secret_key(key):
        return (f"unknown key (value {show(value, key)}); a secret never goes in the config: "
                f"use password_file, password_env or password_credential")
    if path[:1] == ("mqtt",):
        # the broker login's section: a password under a name no pattern foresees
        # ("pwd", "pasword", "credentials") must not reach the journal either
        return "unknown key (its value is not shown in the broker's section); check the spelling"
    return f"unknown key (value {show(value, key)}); check the spelling"


def _key(path: KeyPath):
    return path[-1] if path else None


# ---------------------------------------------------------------- what was expected
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          type(None): "null"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def describe(tp) -> str:
    """What a value of type `tp` must be, in words: "an integer >= 1", "'csv' or 'json'"."""
    return _one_of(_kinds(tp))


def _kinds(tp) -> list[str]:
    base, metas = _unwrap(tp)
    for m in metas:
        if m.description:
            return [m.description]
    origin = get_origin(base)
    if origin in _UNIONS:
        return [k for a in get_args(base) for k in _kinds(a)]
    if origin is Literal:
        return [repr(v) for v in get_args(base)]
    if origin is list or _is_struct(base):
        kind = "a list" if origin is list else "a mapping"
    else:
        kind = _NAMES.get(base, getattr(base, "__name__", str(base)))
    limits = [f"{word} {getattr(m, attr)}" for m in metas for attr, word in _BOUNDS
              if getattr(m, attr) is not None]
    limits += [f"of at least {m.min_length}" + (" item" if origin is list else " character")
               + ("s" if m.min_length != 1 else "") for m in metas if m.min_length is not None]
    return [" and ".join([kind + (" " + limits[0] if limits else "")] + limits[1:])]


def _one_of(kinds: list[str]) -> str:
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]


# ---------------------------------------------------------------- how it is shown
_PLAIN_KEY = re.compile(r"[^\s.\[\]'\"]+")


def fmt_path(loc: KeyPath) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        elif isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:   # an empty, blank or odd key ("", "\r", null, 1.5) must stay visible
            out += f"[{part!r}]"
    return out or "(top level)"


# A password typed into the config by mistake ("password: hunter2") must not be echoed
# into logs by the error that rejects it.  The three *reference* keys hold a path, a
# variable name and a credential name, which are safe and useful to show.
_SECRET_KEY = re.compile(r"pass|secret|token|api_?key", re.I)
_REFERENCE_KEYS = {"password_file", "password_env", "password_credential"}


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key not in _REFERENCE_KEYS and bool(_SECRET_KEY.search(key))


class _ValueRepr(reprlib.Repr):
    """Bounded repr (an alias-bomb value must not produce a gigabyte message) that
    hides the values of secret-looking keys."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist = 3, 8, 8
        self.maxstring, self.maxother = 120, 120

    def repr_dict(self, x, level):
        return super().repr_dict({k: ("<hidden>" if is_secret_key(k) else v)
                                  for k, v in x.items()}, level)


def show(value: Any, key: object = None) -> str:
    if is_secret_key(key):
        return "<hidden>"
    shown = _ValueRepr().repr(value)
    return shown if len(shown) <= 300 else shown[:296] + " ..."
