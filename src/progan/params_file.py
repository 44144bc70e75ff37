"""Reading params.yaml, bytes to data: the file checks and the YAML checks that come before validation (params.py).

A params file is a regular file (a named pipe would block the read forever) of at most MAX_FILE_BYTES, UTF-8 text
without NUL bytes; its YAML nests at most MAX_DEPTH levels, writes no key twice in a mapping, and its aliases
expand to at most MAX_EXPANDED_SIZE (a "billion laughs" alias bomb is refused before anything walks it). Each
problem is one ParamsError line naming the file, the key or the line. `short` / `cut` keep values in messages short.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

import yaml

from progan.errors import ProganError

DEFAULT_NAME = "params.yaml"
MAX_FILE_BYTES = 1 << 20          # the default params.yaml is ~10 KB; a file this large is not a params file
# YAML aliases (*name) share one node: a 2 KB "billion laughs" document expands to gigabytes once anything walks
# it (the schema check, json.dumps, a message). The expansion is measured on the node graph before anything is
# built: nodes plus scalar characters, as if every alias were written out (the default params.yaml: ~4,000).
MAX_EXPANDED_SIZE = 1_000_000
MAX_DEPTH = 64                    # nesting levels (the default params.yaml has 4); PyYAML's scanner takes time
                                  # quadratic in the depth of [ / { and its composer recurses per level
MERGE_TAG = "tag:yaml.org,2002:merge"
SHORT_VALUE_CHARS = 60            # a value quoted in a message is cut to this many characters


class ParamsError(ProganError):
    pass


def cut(text: str, limit: int = SHORT_VALUE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value, limit: int = SHORT_VALUE_CHARS) -> str:
    """A scalar as JSON (`"high"`, `5`), anything else as its type name, cut to `limit` characters: a message
    never holds a whole bad value (a 1 MB string or a deep list would make a 1 MB error line)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return cut(json.dumps(value), limit)
    return f"a {type(value).__name__}"


def read_text(path: Path, name: str) -> str:
    """The file's text: a regular file (a named pipe would block the read forever), of at most MAX_FILE_BYTES,
    UTF-8 without NUL bytes (a binary file gets one line naming it, not a UnicodeDecodeError)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file; run from the project folder or pass --params PATH") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
        raise ParamsError(f"{path}: not a regular file ({what}); pass --params the path of a params.yaml file")
    if st.st_size > MAX_FILE_BYTES:
        raise ParamsError(f"{path}: {st.st_size:,} bytes, over the {MAX_FILE_BYTES:,} a params file may have; "
                          f"is it the right file? (`progan init` writes a fresh params.yaml)")
    try:
        with open(path, "rb", buffering=0) as f:      # no O_NONBLOCK needed: it is a regular file
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ParamsError(f"{path}: cannot read ({e.strerror})") from None
    fix = "params.yaml must be YAML text: restore it (git checkout) or write a fresh one with `progan init`"
    if b"\0" in data:
        raise ParamsError(f"{name}: a binary file, not YAML text (NUL byte at offset {data.index(bytes(1))}); {fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); {fix}") from None


def _dotted(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse, before anything is built from the YAML node graph: a key written twice in one mapping (YAML says
    keys are unique; PyYAML keeps the last one silently), an alias that contains itself, and a document whose
    aliases expand past MAX_EXPANDED_SIZE. One pass, each node once (aliases share nodes)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def children(node, path):
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG:   # `<<: *base` may be overridden
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in seen:
                        raise ParamsError(f"{name}: duplicate key {cut(_dotted(path, key.value), 120)} (lines "
                                          f"{seen[key.tag, key.value]} and {line}); YAML keys must be unique: keep one")
                    seen[key.tag, key.value] = line
                yield key, path
                yield value, _dotted(path, key.value if isinstance(key, yaml.ScalarNode) else "?")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                yield item, f"{path}[{i}]"

    def size(node, path) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if isinstance(node, yaml.ScalarNode):
            return 1 + len(node.value)
        if id(node) in active:
            raise ParamsError(f"{name}: {cut(path or 'the document', 120)} is a YAML alias inside its own anchor "
                              f"(line {node.start_mark.line + 1}): the value would contain itself; write it out")
        active.add(id(node))
        total = 1
        for child, child_path in children(node, path):
            total += size(child, child_path)
            if total > MAX_EXPANDED_SIZE:
                raise ParamsError(f"{name}: {cut(path or 'the document', 120)} expands to over "
                                  f"{MAX_EXPANDED_SIZE:,} nodes and characters through YAML aliases (an alias bomb?); "
                                  f"write the values out")
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, "")


class _Loader(yaml.SafeLoader):
    """SafeLoader (no tags that build objects) that stops at MAX_DEPTH levels of nesting, counted by the scanner
    for [ and { (before the quadratic part) and by the composer for every node."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.params_name, self.depth = name, 0

    def _too_deep(self) -> ParamsError:
        mark = self.get_mark()
        return ParamsError(f"{self.params_name}: line {mark.line + 1} is nested more than {MAX_DEPTH} levels deep; "
                           f"is it the right file?")

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            raise self._too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self._too_deep()
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse(text: str, name: str = DEFAULT_NAME):
    """The YAML document in `text` as Python data (safe tags only), after _check_nodes. One-line ParamsError for
    invalid YAML, nesting past MAX_DEPTH, duplicate keys, self-containing aliases and alias bombs."""
    loader = None
    try:
        loader = _Loader(text, name)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, name)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{name}:{where} is not valid YAML ({cut(getattr(e, 'problem', None) or e, 160)})") from None
    finally:
        if loader is not None:
            loader.dispose()
