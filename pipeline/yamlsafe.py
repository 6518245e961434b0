"""A hardened YAML-to-Python loader that records the line of every key and list item.

It reads the parser's event stream (libyaml's C parser when present, else PyYAML's) and
builds plain Python values without recursion, so it is fast on big manifests and cannot be
driven into a deep recursion, an exponential alias expansion or a huge number conversion:

    * nesting deeper than MAX_YAML_DEPTH                    -> YamlProblem at its line
    * aliases copying more values than the text holds       -> YamlProblem at the alias
      (plus MAX_ALIAS_NODES)
    * numbers longer than MAX_NUMBER_CHARS characters       -> YamlProblem at the number
    * raw control characters (checked before parsing)       -> one problem per line
    * tags other than the plain YAML types                  -> YamlProblem
    * more than one document                                -> YamlProblem

The values are what `yaml.safe_load` returns (str, int, float, bool, None, date/datetime,
bytes, lists and dicts, merge keys `<<` applied), except that every alias use gets its own
copy. Keys that are not strings and duplicate keys are collected as `problems`, which do
not stop the load; everything else raises YamlProblem.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import cut, shorten
from pipeline.limits import (
    MAX_ALIAS_NODES,
    MAX_CONTROL_PROBLEMS,
    MAX_NUMBER_CHARS,
    MAX_YAML_DEPTH,
)

Loc = tuple[str | int, ...]

_Parser: Any = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader
C_PARSER = _Parser is not yaml.SafeLoader

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"
_NULL = "tag:yaml.org,2002:null"
_NUMBERS = {"tag:yaml.org,2002:int": "integer", "tag:yaml.org,2002:float": "number"}
_SCALAR_TAGS = frozenset(
    {
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
        "tag:yaml.org,2002:binary",
    }
)
# YAML forbids these raw; NEL and the Unicode line separators would shift line numbers.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff]")


class YamlProblem(Exception):
    """The text cannot be loaded: a 1-based line and a one-line message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


@dataclass
class Composed:
    """The loaded value, the line of every key and list item, and non-fatal problems."""

    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (line, field, msg)


def control_problems(text: str) -> list[tuple[int, str]]:
    """(line, message) for each line holding a raw control character (first few lines)."""
    found: list[tuple[int, str]] = []
    last_line = 0
    for match in _CONTROL.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if line == last_line:
            continue
        last_line = line
        code = f"U+{ord(match.group()):04X}"
        found.append(
            (
                line,
                f"raw control character {code} is not allowed; escape it in a double-quoted "
                'string (e.g. "\\t") if it is meant',
            )
        )
        if len(found) >= MAX_CONTROL_PROBLEMS:
            break
    return found


def compose(text: str) -> Composed:
    """Load one YAML document; raise YamlProblem when it cannot be loaded at all."""
    if problems := control_problems(text):
        line, message = problems[0]
        raise YamlProblem(line, message)
    loader = _Parser(text)
    try:
        return _Builder(loader).run()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        if "maximum nesting depth" in message:
            # libyaml >= 0.2.6 (PyYAML 6.0.4's wheels) scans ahead of the parser and stops
            # at 1000 levels before our own limit sees them: say it as we say it.
            message = f"nested deeper than {MAX_YAML_DEPTH} levels"
        elif exc.context and exc.context_mark and exc.problem:
            message += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise YamlProblem(mark.line + 1 if mark else 1, message) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        raise YamlProblem(line, f"character {exc.character!r} is not allowed") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, str(exc).splitlines()[0] if str(exc) else "invalid YAML") from None
    finally:
        loader.dispose()


def path_text(loc: Loc, key: str) -> str:
    """The field path of key under loc, e.g. items[2].params.width."""
    prefix = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return f"{prefix}.{key}" if prefix else key


_NO_KEY = object()


class _Frame:
    """A collection being built."""

    __slots__ = (
        "anchor",
        "first",
        "is_map",
        "key",
        "key_line",
        "line",
        "loc",
        "merges",
        "nodes",
        "value",
    )

    def __init__(self, loc: Loc, line: int, is_map: bool, anchor: str | None) -> None:
        self.loc = loc
        self.line = line
        self.is_map = is_map
        self.anchor = anchor
        self.value: Any = {} if is_map else []
        self.nodes = 1  # values in this subtree, aliases counted expanded
        self.key: Any = _NO_KEY  # mappings: the key waiting for its value
        self.key_line = 0
        self.first: dict[str, int] = {}  # own keys -> line, for duplicates
        self.merges: list[tuple[Any, int]] = []  # (value of a `<<` key, line)


class _Builder:
    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.out = Composed(None)
        self.anchors: dict[str, tuple[Any, int]] = {}  # name -> (value, nodes)
        self.open_anchors: set[str] = set()
        self.stack: list[_Frame] = []
        self.alias_nodes = 0  # values copied by aliases
        self.parsed_nodes = 0  # values written out in the text
        self.plain: dict[str, Any] = {}

    def run(self) -> Composed:
        loader = self.loader
        loader.get_event()  # StreamStart
        if loader.check_event(yaml.StreamEndEvent):
            loader.get_event()
            return self.out
        loader.get_event()  # DocumentStart
        get_event, scalar, attach = loader.get_event, self.scalar, self.attach
        handlers = {
            yaml.AliasEvent: self.alias,
            yaml.MappingStartEvent: self.start,
            yaml.SequenceStartEvent: self.start,
            yaml.MappingEndEvent: self.end,
            yaml.SequenceEndEvent: self.end,
        }
        scalar_event, document_end = yaml.ScalarEvent, yaml.DocumentEndEvent
        stack, lines, plain = self.stack, self.out.lines, self.plain
        while True:
            event = get_event()
            kind = type(event)
            if kind is not scalar_event:
                if kind is document_end:
                    break
                handlers[kind](event)
                continue
            # Scalars are most events: the common cases are inlined here.
            line = event.start_mark.line + 1
            self.parsed_nodes += 1
            if event.tag is None and not event.implicit[0]:
                value = event.value  # quoted or block: a string
            else:
                value = plain.get(event.value, _NO_KEY) if event.tag is None else _NO_KEY
                if value is _NO_KEY:
                    value = scalar(event, line)
            if event.anchor is not None:
                self.anchors[event.anchor] = (value, 1)
            top = stack[-1] if stack else None
            if top is not None and top.is_map and value is not _Merge:
                key = top.key
                if key is _NO_KEY:  # a key
                    top.nodes += 1
                    top.key, top.key_line = value, line
                    if type(value) is str:
                        lines[(*top.loc, value)] = line
                    continue
                if type(key) is str and key not in top.first:  # the value of a new key
                    top.nodes += 1
                    top.first[key] = top.key_line
                    top.value[key] = value
                    top.key = _NO_KEY
                    continue
            attach(value, line, 1)
        if not loader.check_event(yaml.StreamEndEvent):
            extra = loader.get_event()
            raise YamlProblem(
                extra.start_mark.line + 1,
                "expected one YAML document, found another ('---'); split it into two files",
            )
        loader.get_event()
        return self.out

    # -- events ---------------------------------------------------------------------
    def start(self, event: Any) -> None:
        line = event.start_mark.line + 1
        is_map = type(event) is yaml.MappingStartEvent
        tag = event.tag
        if tag not in (None, "!", _MAP if is_map else _SEQ):
            raise YamlProblem(line, f"unsupported YAML tag {cut(tag, 60)}")
        if len(self.stack) >= MAX_YAML_DEPTH:
            raise YamlProblem(line, f"nested deeper than {MAX_YAML_DEPTH} levels")
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.parsed_nodes += 1
        self.stack.append(_Frame(self.child_loc(), line, is_map, event.anchor))

    def end(self, event: Any) -> None:
        frame = self.stack.pop()
        value = self.finish(frame) if frame.is_map else frame.value
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
            self.anchors[frame.anchor] = (value, frame.nodes)
        self.attach(value, frame.line, frame.nodes)

    def child_loc(self) -> Loc:
        if not self.stack:
            return ()
        top = self.stack[-1]
        if not top.is_map:
            return (*top.loc, len(top.value))
        if top.key is _NO_KEY:
            return (*top.loc, "<key>")
        return (*top.loc, top.key) if isinstance(top.key, str) else (*top.loc, "<value>")

    def scalar(self, event: Any, line: int) -> Any:
        tag = event.tag
        value = event.value
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return value  # quoted or block scalars are strings
            # Plain scalars repeat (keys above all): their immutable values are cached.
            cached = self.plain.get(value, _NO_KEY)
            if cached is not _NO_KEY:
                return cached
            tag = self.loader.resolve(yaml.ScalarNode, value, event.implicit)
            result = self.construct(tag, event, line)
            if len(value) <= 64 and len(self.plain) < 100_000:
                self.plain[value] = result
            return result
        return self.construct(tag, event, line)

    def construct(self, tag: str, event: Any, line: int) -> Any:
        if tag == _STR:
            return event.value
        if tag == _NULL:
            return None
        if tag == _MERGE:
            return _Merge
        if tag not in _SCALAR_TAGS:
            raise YamlProblem(line, f"unsupported YAML tag {cut(tag, 60)}")
        kind = _NUMBERS.get(tag)
        if kind and len(event.value) > MAX_NUMBER_CHARS:
            raise YamlProblem(
                line,
                f"{kind} too long ({len(event.value)} characters, at most {MAX_NUMBER_CHARS}); "
                "quote it if it is text",
            )
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's constructors fail in many ways on odd scalars
            name = tag.rsplit(":", 1)[-1]
            detail = f" ({shorten(str(exc), 80)})" if type(exc) is ValueError and str(exc) else ""
            raise YamlProblem(
                line, f"invalid {name} {cut(event.value, 60)}{detail}; quote it if it is text"
            ) from None

    def alias(self, event: Any) -> None:
        name, line = event.anchor, event.start_mark.line + 1
        if name in self.open_anchors:
            raise YamlProblem(line, f"recursive alias *{cut(name, 60)}")
        if name not in self.anchors:
            raise YamlProblem(line, f"undefined alias *{cut(name, 60)}")
        value, nodes = self.anchors[name]
        self.alias_nodes += nodes
        # Aliases may at most double what the text itself spells out (plus a fixed allowance).
        if self.alias_nodes > MAX_ALIAS_NODES + self.parsed_nodes:
            raise YamlProblem(
                line,
                f"aliases expand to {self.alias_nodes} values, more than the text itself holds "
                "(an alias bomb?)",
            )
        self.attach(copy.deepcopy(value), line, nodes)

    # -- building ---------------------------------------------------------------------
    def attach(self, value: Any, line: int, nodes: int) -> None:
        if value is _Merge and not (self.stack and self.stack[-1].is_map):
            raise YamlProblem(line, "'<<' is a merge key; quote it if it is text")
        if value is _Merge and self.stack[-1].key is not _NO_KEY:
            raise YamlProblem(line, "'<<' is a merge key; quote it if it is text")
        if not self.stack:
            self.out.data = value
            return
        top = self.stack[-1]
        top.nodes += nodes
        if not top.is_map:
            self.out.lines[(*top.loc, len(top.value))] = line
            top.value.append(value)
        elif top.key is _NO_KEY:
            top.key, top.key_line = value, line
            if isinstance(value, str):
                self.out.lines[(*top.loc, value)] = line
        else:
            self.set_item(top, top.key, top.key_line, value)
            top.key = _NO_KEY

    def set_item(self, frame: _Frame, key: Any, line: int, value: Any) -> None:
        if key is _Merge:
            frame.merges.append((value, line))
            return
        if not isinstance(key, str):
            message = f"keys must be strings, got {_kind(key)}; quote it"
            self.out.problems.append((line, path_text(frame.loc, _key_text(key)), message))
            return
        if key in frame.first:
            message = f"duplicate key (first given at line {frame.first[key]})"
            self.out.problems.append((line, path_text(frame.loc, key), message))
        else:
            frame.first[key] = line
        frame.value[key] = value

    def finish(self, frame: _Frame) -> dict[str, Any]:
        """Apply merge keys: own keys win, then earlier merged mappings over later ones."""
        own: dict[str, Any] = frame.value
        if not frame.merges:
            return own
        merged: dict[str, Any] = {}
        for value, line in frame.merges:
            sources = value if isinstance(value, list) else [value]
            if not all(isinstance(s, dict) for s in sources):
                raise YamlProblem(line, "'<<' merges only a mapping or a list of mappings")
            for source in reversed(sources):
                for key in source:
                    self.out.lines.setdefault((*frame.loc, key), line)
                merged.update(source)
        merged.update(own)
        return merged


class _MergeKey:
    """The `<<` key; one object, kept by copies."""

    def __repr__(self) -> str:
        return "<<"

    def __copy__(self) -> _MergeKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _MergeKey:
        return self


_Merge: Any = _MergeKey()


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({cut(value, 40)})"
    if isinstance(value, float):
        return f"a number ({cut(value, 40)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _key_text(key: Any) -> str:
    return "<key>" if isinstance(key, list | dict) else shorten(str(key), 60)
