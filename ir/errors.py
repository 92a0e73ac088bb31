"""The exceptions graphopt raises for bad input, each carrying where it happened and how to fix it.

Every error a user can cause (a malformed file, an unknown op, a cyclic graph, a bad option) is a
`GraphoptError`. The command line prints `str(error)` and exits with status 2; it never shows a
traceback for these. Anything else escaping is a bug in graphopt.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class: a problem with the user's model, options or files.

    `where` names the file, graph or node; `hint` says how to fix it.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ModelLoadError(GraphoptError):
    """The file is not a readable ONNX model (truncated, not protobuf, missing external data...)."""


class InvalidGraphError(GraphoptError):
    """The graph breaks the IR's rules: a cycle, an undefined input, a duplicate name, a bad type."""


class UnsupportedOpError(GraphoptError):
    """An op that graphopt cannot interpret or lower (unknown standard op, no implementation)."""


class TextParseError(GraphoptError):
    """The IR text form could not be parsed; `where` is `line:column`."""


class SaveError(GraphoptError):
    """The model could not be written (unwritable path, disk full...). No partial file is left."""
