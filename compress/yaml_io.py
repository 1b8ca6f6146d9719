"""Reading recipe YAML safely: bounded, strict, YAML 1.2 scalars, every problem one line.

Why: ``yaml.safe_load`` is safe from code execution but not from hostile or careless input.
It reads YAML 1.1, where ``off``/``yes``/``no`` are booleans and ``1e-4`` (no dot) is a string;
it keeps the last of two duplicate keys silently; it has no size cap; and an "alias bomb"
(anchors referring to anchors, ``&b [*a, *a, ...]``) stays small in memory but expands to
billions of nodes as soon as anything walks it (an error message's repr, a type check), which
ran for a minute before a MemoryError. :func:`load_yaml` and :func:`parse_yaml_value` read
with :class:`RecipeLoader`, which differs from ``SafeLoader`` in exactly these points:

- scalars follow the YAML 1.2 core schema: booleans are only ``true``/``false`` (any case
  form YAML allows), so ``latency: off`` stays the string ``"off"``; floats include ``1e-4``
  and ``5E-3`` (an exponent without a dot); integers are decimal, ``0o`` or ``0x`` (``012`` is
  12, not octal 10; ``1:30`` is a string, not 90); dates stay strings.
- a key given twice in one mapping is an error naming the key and both lines (merge keys
  ``<<`` may still be overridden, as YAML intends).
- anchors and aliases work, but a document whose *expanded* size exceeds ``max_nodes``, or
  whose aliases refer to themselves, is refused in time linear in the file, before anything
  is built from it; so is one nested more than ``MAX_DEPTH`` levels.
- the file is at most ``max_bytes`` (recipes are a few kB), UTF-8 (a BOM is allowed);
  anything else is one line naming the file and the byte offset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import AdcError, short_repr

__all__ = ["MAX_BYTES", "MAX_NODES", "RecipeLoader", "load_yaml", "parse_yaml_value", "FLOAT_RE"]

MAX_BYTES = 256 * 1024  # the full AdcSR recipe is 3 kB; PyYAML reads ~100 kB/s
MAX_NODES = 100_000  # after alias expansion; a recipe has a few hundred
MAX_DEPTH = 64  # nesting levels; a recipe has 5

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"

#: YAML 1.2 core-schema floats; a dot or an exponent is required, so integers stay integers.
FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                          |[-+]?[0-9]+[eE][-+]?[0-9]+
                          |[-+]?\.(?:inf|Inf|INF)
                          |\.(?:nan|NaN|NAN))$""", re.X)
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class RecipeLoader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 core scalars, duplicate-key errors and bounded alias expansion."""

    max_nodes = MAX_NODES
    max_depth = MAX_DEPTH
    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # PyYAML's scanner is quadratic in the nesting depth and its composer recursive:
        # stop early instead of after seconds of scanning and a RecursionError.
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise ComposerError(None, None, f"nested more than {self.max_depth} levels deep",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        _check_expansion(node, self.max_nodes)
        return node

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                if first is not None:
                    raise ConstructorError(None, None, f"duplicate key {short_repr(key)} (first given on line "
                                                       f"{first + 1}); give each key once", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Node) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        if text[:2] in ("0o", "0x"):
            return sign * int(text[2:], 8 if text[1] == "o" else 16)
        return sign * int(text, 10)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
RecipeLoader.add_implicit_resolver(_FLOAT, FLOAT_RE, list("-+0123456789."))
RecipeLoader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
RecipeLoader.add_constructor(_INT, RecipeLoader.construct_yaml_int)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node | None, limit: int) -> None:
    """Refuse a node graph whose tree expansion has more than ``limit`` nodes, or a cycle.

    Aliases make the composed graph a DAG that shares nodes; its expanded size is computed
    bottom-up with one entry per distinct node, so a billion-node bomb costs a few hundred steps.
    """
    if root is None:
        return
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                why = ("expands to more than {} values through its aliases (*name); write the values out"
                       if len(sizes) <= limit else "has more than {} values; is this a recipe?")
                raise ComposerError(None, None, "the document " + why.format(limit), node.start_mark)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ComposerError(None, None, "an alias (*name) refers to a value that contains it", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _check_flow_depth(text: str, where: str) -> None:
    """Refuse more than ``MAX_DEPTH`` open ``[``/``{`` before PyYAML sees them.

    Why: PyYAML's scanner keeps every bracket on a line as a possible key and rescans them all
    per token, so ``[[[[...`` costs seconds before the composer's depth limit is reached. Brackets
    inside quoted strings are counted too; a recipe never has dozens of them open.
    """
    import numpy as np

    data = np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8)
    step = np.zeros(len(data), dtype=np.int32)
    step[(data == ord("[")) | (data == ord("{"))] = 1
    step[(data == ord("]")) | (data == ord("}"))] = -1
    depth = np.cumsum(step)
    if len(depth) and depth.max() > MAX_DEPTH:
        at = int(np.argmax(depth > MAX_DEPTH))
        line = int(np.count_nonzero(data[:at] == ord("\n"))) + 1
        raise AdcError(f"{where}: line {line}: not valid YAML (nested more than {MAX_DEPTH} levels deep)")


def _parse(text: str, where: str, max_nodes: int) -> Any:
    _check_flow_depth(text, where)
    loader = None
    try:
        loader = RecipeLoader(text)
        loader.max_nodes = max_nodes
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise AdcError(f"{where}: line {line}: character #x{exc.character:04x} is not allowed in YAML "
                       f"(a control character; is this a text file?)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or type(exc).__name__).split())
        raise AdcError(f"{where}:{line}: not valid YAML ({problem[:200]})") from None
    except yaml.YAMLError as exc:
        raise AdcError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise AdcError(f"{where}: nested too deeply to read (thousands of levels); is this a recipe?") from None
    finally:
        if loader is not None:
            loader.dispose()


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 (BOM allowed) -> str; a bad byte is one line with its offset and line number."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AdcError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
                       f"save the file as UTF-8") from None


def load_yaml(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES,
              what: str = "recipe") -> Any:
    """Read a YAML file with :class:`RecipeLoader`; every problem is an :class:`AdcError` naming ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise AdcError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise AdcError(f"{path}: is a folder, expected a {what} file") from None
    except OSError as exc:
        raise AdcError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise AdcError(f"{path}: larger than {max_bytes} bytes, too large for a {what} (is it the right file?)")
    return _parse(decode_utf8(data, str(path)), str(path), max_nodes)


def parse_yaml_value(text: str, where: str, *, max_bytes: int = 64 * 1024, max_nodes: int = 10_000) -> Any:
    """One value given on the command line (``--set key=VALUE``), read like a recipe value."""
    if len(text.encode("utf-8", "surrogateescape")) > max_bytes:
        raise AdcError(f"{where}: the value is longer than {max_bytes} bytes")
    return _parse(text, where, max_nodes)
