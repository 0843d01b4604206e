"""The config file as YAML: its data, and the line of every key path in it.

PyYAML's pure-Python loader on purpose: libyaml's composer overflows the C stack
(segfault) on deeply nested flow collections.  Every failure is a ConfigError with the
file's name and, where known, the line.
"""
from __future__ import annotations

import yaml

from .config_base import ConfigError
from .config_build import fmt_path, show

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader whose bad scalars are YAML errors with a line, not crashes.

    PyYAML raises ValueError, IndexError, KeyError... when a scalar does not fit its
    explicit or implicit tag (`!!int x`, `!!bool maybe`, the date `2024-13-45`).
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {show(node.value)} as {node.tag.rsplit(':', 1)[-1]}",
                node.start_mark) from None


def read_yaml(text: str, source: str) -> tuple[dict, dict[tuple, int]]:
    """The document's top-level mapping and the 1-based line of each key path in it."""
    # One parse: compose the node tree (it has the line numbers), index it, then build
    # the data from it.
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        lines, duplicates = _line_index(root) if root is not None else ({}, [])
        # after indexing: building the data rewrites "<<" merge nodes in place
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError([f"{source}: expected a mapping at the top level, got {got}"])
    if duplicates:
        raise ConfigError([f"{source}:{d}" for d in duplicates])
    return data, lines


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of `path`, or of its nearest parent in the file (a missing key's)."""
    for n in range(len(path), -1, -1):
        line = lines.get(path[:n])
        if line:
            return line
    return None


def _line_index(root: yaml.Node) -> tuple[dict[tuple, int], list[str]]:
    """Map each key path (as a tuple of keys/indices) to its 1-based YAML line, and
    list duplicate keys (safe_load silently keeps the last one).

    Each node is walked once: paths under the second use of an alias fall back to the
    line of the key that uses it, and a self-referencing or exponentially nested alias
    cannot make the walk loop or explode.
    """
    lines: dict[tuple, int] = {(): root.start_mark.line + 1}
    duplicates: list[str] = []
    # Keys as safe_load builds them ("1:" is the int 1), so paths match the data's.
    keys = _Loader("")
    walked: set[int] = set()

    def walk(node, path):
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.tag == _MERGE_TAG:       # "<<: *base": its keys live at the anchor
                    continue
                key = keys.construct_object(k, deep=True)
                try:
                    hash(key)
                except TypeError:             # construct_document reports it, with its line
                    continue
                p = path + (key,)
                if p in lines:
                    duplicates.append(f"{k.start_mark.line + 1}: {fmt_path(p)}: duplicate "
                                      f"key (first on line {lines[p]}); remove one")
                    continue
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return lines, duplicates
