"""Key patterns with typed captures, e.g. ``cc_mean_transforms.{k:int}.{rest}``.

A capture is ``{name}`` or ``{name:type}``.  Types:

- ``path`` (the default): one or more characters, dots included (``0.weight``);
- ``int``: a decimal index (``12``);
- ``name``: one dotted segment (``ln1``).

A pattern matches a whole key.  ``format`` fills a template from captured values, so a rule's source
pattern and target template read like the two layouts they connect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+))?\}")
_TYPES = {"path": r".+?", "int": r"\d+", "name": r"[^.]+"}


class PatternError(ValueError):
    """A pattern is malformed (unknown capture type, repeated name, stray brace)."""


@dataclass(frozen=True)
class KeyPattern:
    text: str
    names: tuple[str, ...] = field(init=False)
    types: tuple[str, ...] = field(init=False)
    _regex: re.Pattern = field(init=False, repr=False, compare=False)
    #: the literal text before the first capture (with the last piece, the literal text after the last
    #: capture: a quick refusal before the regex)
    _head: str = field(init=False, repr=False, compare=False)
    #: the template as literal parts and capture names, alternately (literal first)
    _pieces: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise PatternError("a key pattern must be a non-empty string")
        parts: list[str] = []
        names: list[str] = []
        types: list[str] = []
        pos = 0
        for m in _CAPTURE.finditer(self.text):
            literal = self.text[pos : m.start()]
            if "{" in literal or "}" in literal:
                raise PatternError(f"stray brace in pattern {self.text!r}")
            parts.append(re.escape(literal))
            name, kind = m.group(1), m.group(2) or "path"
            if kind not in _TYPES:
                raise PatternError(f"unknown capture type {kind!r} in {self.text!r} (use one of {sorted(_TYPES)})")
            if name in names:
                raise PatternError(f"capture {name!r} appears twice in {self.text!r}")
            parts.append(f"(?P<{name}>{_TYPES[kind]})")
            names.append(name)
            types.append(kind)
            pos = m.end()
        tail = self.text[pos:]
        if "{" in tail or "}" in tail:
            raise PatternError(f"stray brace in pattern {self.text!r}")
        parts.append(re.escape(tail))
        pieces = _CAPTURE.split(self.text)  # literal, name, type, literal, name, type, ..., literal
        object.__setattr__(self, "_head", pieces[0])
        object.__setattr__(self, "_pieces", tuple(p for i, p in enumerate(pieces) if i % 3 != 2))
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "types", tuple(types))
        object.__setattr__(self, "_regex", re.compile("".join(parts) + r"\Z", re.DOTALL))

    def match(self, key: str) -> dict[str, str | int] | None:
        """Captured values (ints for ``int`` captures), or None when the key does not match."""
        if not (key.startswith(self._head) and key.endswith(self._pieces[-1])):
            return None
        m = self._regex.match(key)
        if m is None:
            return None
        return {n: int(m.group(n)) if t == "int" else m.group(n) for n, t in zip(self.names, self.types)}

    def format(self, values: Mapping[str, object]) -> str:
        """Fill the captures from ``values``; a missing name is an error."""
        pieces = self._pieces
        out = [pieces[0]]
        for i in range(1, len(pieces), 2):
            name = pieces[i]
            if name not in values:
                raise PatternError(f"template {self.text!r} needs {name!r}, which the source pattern does not capture")
            out.append(str(values[name]))
            out.append(pieces[i + 1])
        return "".join(out)

    @property
    def head(self) -> str:
        """The literal text every matching key starts with (before the first capture)."""
        return self._head

    @property
    def tail(self) -> str:
        """The literal text every matching key ends with (after the last capture)."""
        return self._pieces[-1]

    @property
    def is_literal(self) -> bool:
        return not self.names


def capture_names(template: str) -> tuple[str, ...]:
    return KeyPattern(template).names
