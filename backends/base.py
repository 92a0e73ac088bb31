"""The backend interface and the registry of backends.

A backend turns an IR model into something that runs: it has a name, says whether it can run on
this machine (`unavailable()`), which nodes it supports (`supports(node, opset)`), and compiles a
model for a target into an `Executable` with `run(inputs) -> outputs` (name -> numpy array),
`benchmark(inputs)` and, where it makes an artifact, `save(path)`.

    backend = get_backend("onnxruntime")
    executable = backend.compile(model, target=None, threads=2)
    outputs = executable.run({"x": x})

Built-in backends are listed in `BUILTIN_BACKENDS` as module paths and imported on first use (so
`import graphopt` stays light and a missing optional runtime costs nothing until asked for);
third-party backends register under the entry-point group `graphopt.backends` (entry point name =
backend name, object = a `Backend` subclass). A name can be registered once. See docs/backends.md
for writing one.
"""

from __future__ import annotations

import difflib
import importlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir.core import Model, Node
from graphopt.ir.errors import GraphoptError

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "Executable",
    "all_backends",
    "get_backend",
    "register_backend",
]


class BackendError(GraphoptError):
    """A backend cannot be found, is not available here, or cannot compile or run a model."""


class Executable:
    """A compiled model. Subclasses implement `run`; `benchmark` and `save` have defaults."""

    input_names: Sequence[str] = ()
    output_names: Sequence[str] = ()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def benchmark(
        self, inputs: Mapping[str, np.ndarray], *, warmup: int = 5, runs: int = 30
    ) -> dict[str, float]:
        """Median and spread of `runs` timed runs after `warmup` runs, in milliseconds."""
        for _ in range(warmup):
            self.run(inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return {
            "median_ms": statistics.median(times),
            "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10],
        }

    def save(self, path: str) -> list[str]:
        """Write the compiled artifact; returns the files written."""
        raise BackendError(f"{type(self).__name__} has no artifact to save")


class Backend:
    """Base class of backends; see the module docstring."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ()  # the targets `compile` accepts, first = default

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (a missing package, no device), or None."""
        return None

    def supports(self, node: Node, opset: int) -> bool:
        """Whether this backend can run `node` (graphs mixing backends split on this)."""
        return True

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        raise NotImplementedError

    def unsupported(self, model: Model) -> list[Node]:
        """The nodes of the model's main graph this backend cannot run."""
        return [node for node in model.graph if not self.supports(node, model.opset)]


@dataclass
class BackendInfo:
    name: str
    load: Callable[[], type[Backend]]
    origin: str


BUILTIN_BACKENDS: dict[str, str] = {
    "reference": "graphopt.backends.reference_backend:ReferenceBackend",
    "onnxruntime": "graphopt.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "graphopt.backends.openvino:OpenVinoBackend",
    "tvm": "graphopt.backends.tvm:TvmBackend",
    "torch": "graphopt.backends.torch:TorchBackend",
}

_REGISTRY: dict[str, BackendInfo] = {}
_LOADED = False


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator registering a backend under `cls.name` (once)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    builtin = BUILTIN_BACKENDS.get(cls.name, "").partition(":")[0]
    if (builtin and builtin != cls.__module__) or (
        existing is not None and existing.origin not in ("built-in", "plugin-loading")
    ):
        raise ValueError(f"backend '{cls.name}' is already registered")
    _REGISTRY[cls.name] = BackendInfo(
        cls.name, lambda: cls, "built-in" if builtin else cls.__module__
    )
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name, target in BUILTIN_BACKENDS.items():
        _REGISTRY.setdefault(name, BackendInfo(name, _builtin_loader(target), "built-in"))
    from importlib.metadata import entry_points

    for entry in entry_points(group="graphopt.backends"):
        if entry.name in _REGISTRY:
            raise BackendError(
                f"plugin backend '{entry.name}' ({entry.value}) clashes with an existing backend",
                hint="rename the plugin's entry point",
            )
        _REGISTRY[entry.name] = BackendInfo(entry.name, _plugin_loader(entry), "plugin")


def _builtin_loader(target: str) -> Callable[[], type[Backend]]:
    def load() -> type[Backend]:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    return load


def _plugin_loader(entry: Any) -> Callable[[], type[Backend]]:
    def load() -> type[Backend]:
        _REGISTRY[entry.name].origin = "plugin-loading"
        cls = entry.load()
        _REGISTRY[entry.name] = BackendInfo(entry.name, lambda: cls, "plugin")
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BackendError(
                f"plugin backend '{entry.name}' ({entry.value}) is not a Backend class"
            )
        return cls  # type: ignore[no-any-return]

    return load


def all_backends() -> dict[str, BackendInfo]:
    _load()
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as `name`; `BackendError` with close names if none,
    or with the reason if it cannot run on this machine."""
    backends = all_backends()
    if name not in backends:
        close = difflib.get_close_matches(name, list(backends), n=3, cutoff=0.5)
        raise BackendError(
            f"unknown backend '{name}'",
            hint=(f"did you mean {', '.join(close)}? " if close else "")
            + f"backends: {', '.join(sorted(backends))}",
        )
    try:
        backend = backends[name].load()()
    except ImportError as error:
        raise BackendError(
            f"backend '{name}' cannot be loaded: {error}",
            hint="install what it needs (see `graphopt backends`)",
        ) from None
    reason = backend.unavailable()
    if reason:
        raise BackendError(f"backend '{name}' is not available here: {reason}")
    return backend
