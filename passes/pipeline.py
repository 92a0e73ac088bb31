"""Pipeline strings: parse `fold-constants,eliminate-dead-code,fuse-attention{max-seq=4096}`.

Grammar: passes separated by commas; each pass may carry options in braces, separated by spaces,
`name=value`; a list value uses commas (`{axes=0,1}`). Option names are the pass dataclass's field
names in kebab-case, and values are converted to the field's type (int, float, bool, str, a
`Literal` choice, or a list of those). Presets `O0`..`O3` expand to their passes:

    O0  nothing
    O1  clean-up to a fixpoint: infer-shapes, fold-constants, simplify-shapes, canonicalize,
        eliminate-common-subexpressions, eliminate-dead-code
    O2  O1, then upgrade-opset (to 23, where the fused standard ops live) and the fusions in the
        order each enables the next (normalizations, GELU, rotary, attention, Q/K/V, the ONNX
        Runtime-only forms, conv activations, transposes, bias Adds), then O1 again
    O3  O2 + layout and placement

A mistake is one `PipelineError` whose message shows the pipeline with a caret under the offending
text and lists the close names or the valid options.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from graphopt.ir.errors import GraphoptError
from graphopt.passes.manager import Fixpoint, Pass, PipelineItem, all_passes, get_pass

__all__ = ["PRESETS", "PipelineError", "format_pass", "parse_pipeline", "preset_names"]

CLEANUP = [
    "freeze-initializers",
    "infer-shapes",
    "fold-constants",
    "simplify-shapes",
    "canonicalize",
    "fold-batchnorm",
    "fold-conv-bias",
    "eliminate-common-subexpressions",
    "eliminate-dead-code",
]
# Each fusion's module docstring says what it must follow; this order satisfies all of them.
FUSION: list[str] = [
    "upgrade-opset",
    "fuse-layernorm",
    "fuse-rmsnorm",
    "fuse-gelu",
    "fuse-rotary",
    "fuse-attention",
    "fuse-qkv",
    "fuse-skip-layernorm",
    "fuse-bias-gelu",
    "fuse-conv-activation",
    "reorder-activation-pooling",
    "fold-transpose-into-matmul",
    "fuse-matmul-add",
]
LAYOUT: list[str] = []

PRESETS: dict[str, list[str]] = {
    "O0": [],
    "O1": CLEANUP,
    "O2": CLEANUP + FUSION,
    "O3": CLEANUP + FUSION + LAYOUT,
}


class PipelineError(GraphoptError):
    """A pipeline string that names an unknown pass, an unknown option or a bad value."""


def preset_names(name: str) -> list[str]:
    return list(PRESETS[name])


def _preset(name: str) -> list[PipelineItem]:
    cleanup = Fixpoint([get_pass(n)() for n in CLEANUP])
    items: list[PipelineItem] = [cleanup] if name != "O0" else []
    extra = PRESETS[name][len(CLEANUP) :]
    if extra:
        items += [get_pass(n)() for n in extra] + [Fixpoint([get_pass(n)() for n in CLEANUP])]
    return items


def parse_pipeline(text: str | Sequence[str | Pass]) -> list[PipelineItem]:
    """Pipeline string (or a list of pass names / pass objects) -> passes to run."""
    if not isinstance(text, str):
        items: list[PipelineItem] = []
        for entry in text:
            items += [entry] if isinstance(entry, Pass) else parse_pipeline(entry)
        return items
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, message: str, start: int, end: int, hint: str | None = None) -> PipelineError:
        width = max(1, end - start)
        picture = f"\n  {self.text}\n  {' ' * start}{'^' * width}"
        return PipelineError(
            f"{message} (column {start + 1}){picture}", where="pipeline", hint=hint
        )

    def parse(self) -> list[PipelineItem]:
        items: list[PipelineItem] = []
        if not self.text.strip():
            return items
        while True:
            items += self.item()
            self.skip_spaces()
            if self.pos >= len(self.text):
                return items
            if self.text[self.pos] != ",":
                raise self.fail(
                    f"expected ',' between passes, found '{self.text[self.pos]}'",
                    self.pos, self.pos + 1,
                    hint="separate passes with commas; options go in braces: name{key=value}",
                )  # fmt: skip
            self.pos += 1

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def word(self) -> tuple[str, int]:
        self.skip_spaces()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] in "-_."
        ):
            self.pos += 1
        return self.text[start : self.pos], start

    def item(self) -> list[PipelineItem]:
        name, start = self.word()
        if not name:
            found = self.text[self.pos] if self.pos < len(self.text) else "the end"
            raise self.fail(f"expected a pass name, found {found!r}", start, start + 1)
        end = self.pos
        if name in PRESETS or name.upper() in PRESETS:
            if self.pos < len(self.text) and self.text[self.pos] == "{":
                raise self.fail(f"preset {name} takes no options", self.pos, self.pos + 1)
            return _preset(name.upper())
        passes = all_passes()
        if name not in passes:
            close = difflib.get_close_matches(name, list(passes) + list(PRESETS), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "`graphopt passes` lists them"
            raise self.fail(f"unknown pass '{name}'", start, end, hint)
        cls = passes[name].cls
        values: dict[str, Any] = {}
        if self.pos < len(self.text) and self.text[self.pos] == "{":
            values = self.options(cls, name)
        try:
            return [cls(**values)]
        except (TypeError, ValueError) as error:
            raise self.fail(f"bad options for '{name}': {error}", start, self.pos) from None

    def options(self, cls: type[Pass], pass_name: str) -> dict[str, Any]:
        close = self.text.find("}", self.pos)
        if close < 0:
            raise self.fail("'{' is never closed", self.pos, self.pos + 1, hint="add '}'")
        fields = _option_fields(cls)
        values: dict[str, Any] = {}
        offset = self.pos + 1
        for token in self.text[offset:close].split(" "):
            start = offset
            offset += len(token) + 1
            if not token:
                continue
            key, eq, raw = token.partition("=")
            end = start + len(token)
            if key not in fields:
                known = ", ".join(f"{k} ({_type_name(t)})" for k, (_, t, _) in fields.items())
                close_keys = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"did you mean {close_keys[0]}? " if close_keys else ""
                raise self.fail(
                    f"'{pass_name}' has no option '{key}'", start, start + len(key),
                    hint + (f"its options: {known}" if known else f"'{pass_name}' takes no options"),
                )  # fmt: skip
            field_name, kind, _ = fields[key]
            if not eq:
                raise self.fail(f"option '{key}' needs a value: {key}=...", start, end)
            try:
                values[field_name] = convert(raw, kind)
            except ValueError as error:
                raise self.fail(f"option '{key}': {error}", start + len(key) + 1, end) from None
        self.pos = close + 1
        return values


def _option_fields(cls: type[Pass]) -> dict[str, tuple[str, Any, Any]]:
    """kebab-name -> (field name, type, default) for the options of a pass class."""
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {
        f.name.replace("_", "-"): (f.name, hints.get(f.name, str), f.default)
        for f in dataclasses.fields(cls)
        if f.init and not f.name.startswith("_")
    }


def convert(raw: str, kind: Any) -> Any:
    """Convert an option value written in a pipeline string to the field's type."""
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        return convert(raw, args[0])
    if origin is Literal:
        choices = get_args(kind)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ValueError(f"'{raw}' is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple, Sequence) or kind in (list, tuple):
        (item,) = get_args(kind)[:1] or (str,)
        items = [convert(part, item) for part in raw.split(",") if part != ""]
        return tuple(items) if origin is tuple else items
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got '{raw}'")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got '{raw}'") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got '{raw}'") from None
    return raw


def _type_name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin is Literal:
        return "|".join(map(str, get_args(kind)))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(kind)[0])}"
    if origin in (typing.Union, types.UnionType):
        return _type_name([a for a in get_args(kind) if a is not type(None)][0])
    return getattr(kind, "__name__", str(kind))


def format_pass(pass_: Pass) -> str:
    """`name{opt=value ...}` with the options that differ from their defaults."""
    changed: list[str] = []
    if dataclasses.is_dataclass(pass_):
        for f in dataclasses.fields(pass_):
            value = getattr(pass_, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if value != default:
                text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
                changed.append(
                    f"{f.name.replace('_', '-')}={text.lower() if isinstance(value, bool) else text}"
                )
    return pass_.name + (f"{{{' '.join(changed)}}}" if changed else "")
