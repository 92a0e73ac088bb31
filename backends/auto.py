"""`--target auto`: compile a model for every backend available here, check each one's outputs
against the reference interpreter, time them side by side, and keep the fastest correct one.

Which runtime is fastest depends on the model (OpenVINO beats ONNX Runtime on some of the zoo and
loses on others), so it is measured, not guessed. The method is `../shared/notes/benchmarking.md`'s:
the same inputs for every candidate, 2 threads each (ONNX Runtime's sessions never spin-wait, see
graphopt.backends.onnxruntime), warm-up runs, then rounds in which every candidate runs once, the
order shuffled each round so that drift in machine speed hits all alike; medians are compared. A
candidate still `cutoff` times slower than the fastest after `min_rounds` rounds stops being timed
(it cannot win), which keeps the reference interpreter from costing minutes on big models.

A backend that is unavailable here, fails to compile or run, or whose outputs differ from the
reference interpreter's by more than `rtol` of each output's scale is excluded, with the reason.
This places whole models on one engine; placing subgraphs is later work.

    selection = select_backend(model, feeds, threads=2)
    console.print(selection.table())
    written = save_artifact(selection.winner, model, "out.onnx")   # out.xml for openvino
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, all_backends
from graphopt.backends.timing import time_paired
from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import TensorType

__all__ = [
    "ARTIFACT_SUFFIXES",
    "Candidate",
    "Selection",
    "artifact_path",
    "compare_outputs",
    "compile_and_save",
    "feed_dims",
    "save_artifact",
    "select_backend",
]

ORACLE = "reference"
FIRST_RUN_CUTOFF = 50.0  # see _without_hopeless
# the file each backend's `Executable.save` writes; a backend not listed here may set
# `artifact_suffix` on its executables, else the path is used as given
ARTIFACT_SUFFIXES = {"reference": ".onnx", "onnxruntime": ".onnx", "openvino": ".xml", "tvm": ".so"}


@dataclass
class Candidate:
    """One backend in the selection: its status (`ok`, `unavailable`, `failed`, `wrong`), why,
    the compiled executable and the times of its timed runs (ms)."""

    backend: str
    status: str = "ok"
    note: str = ""
    executable: Executable | None = None
    times_ms: list[float] = field(default_factory=list)
    first_run_ms: float = 0.0  # the checking run's time
    compile_s: float = 0.0

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def correct(self) -> bool | None:
        return {"ok": True, "wrong": False}.get(self.status)


@dataclass
class Selection:
    """The outcome of `select_backend`: every candidate, and the fastest correct one."""

    candidates: list[Candidate]
    winner: Candidate | None
    threads: int
    rounds: int

    def ratio(self, candidate: Candidate) -> float | None:
        best = self.winner.median_ms if self.winner else None
        median = candidate.median_ms
        return median / best if median is not None and best else None

    def table(self) -> Any:
        """A rich `Table`: backend, median ms, ratio to the fastest, correct?, notes."""
        from rich.table import Table

        title = f"backends ({self.threads} threads, {self.rounds} rounds, paired)"
        table = Table(title=title, title_justify="left")
        for column in ("backend", "median ms", "ratio", "correct", "notes"):
            table.add_column(
                column, justify="right" if column in ("median ms", "ratio") else "left"
            )
        order = sorted(
            self.candidates,
            key=lambda c: (c.median_ms is None or c.status != "ok", c.median_ms or 0.0),
        )
        for c in order:
            median, ratio = c.median_ms, self.ratio(c)
            correct = "-" if c.correct is None else "yes" if c.correct else "no"
            table.add_row(
                f"[bold]{c.backend}[/] *" if c is self.winner else c.backend,
                f"{median:.3f}" if median is not None else "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
                correct,
                c.note,
            )
        return table

    def as_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner.backend if self.winner else None,
            "threads": self.threads,
            "candidates": [
                {"backend": c.backend, "status": c.status, "note": c.note,
                 "median_ms": c.median_ms, "ratio": self.ratio(c), "runs": len(c.times_ms),
                 "compile_s": c.compile_s}
                for c in self.candidates
            ],
        }  # fmt: skip


def compare_outputs(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], rtol: float = 1e-4
) -> str | None:
    """Why `actual` differs from `expected`, or None: same names, shapes and dtypes, NaNs in the
    same places, and `max |actual - expected| <= rtol * max |expected|` per output (exact for
    outputs that are all zeros, bools and strings)."""
    for name, e in expected.items():
        if name not in actual:
            return f"output '{name}' missing"
        a, e = np.asarray(actual[name]), np.asarray(e)
        if a.shape != e.shape:
            return f"output '{name}' has shape {list(a.shape)}, expected {list(e.shape)}"
        if a.dtype != e.dtype:
            return f"output '{name}' is {a.dtype}, expected {e.dtype}"
        if e.dtype.kind not in "iufc":
            if not np.array_equal(a, e):
                return f"output '{name}' differs"
            continue
        wide = np.complex128 if "c" in (a.dtype.kind, e.dtype.kind) else np.float64
        a64, e64 = a.astype(wide), e.astype(wide)
        nan = np.isnan(e64)
        if not np.array_equal(nan, np.isnan(a64)):
            return f"output '{name}' has NaNs where the reference has none, or the reverse"
        inf = np.isinf(e64)
        if not np.array_equal(e64[inf], a64[inf]) or np.isinf(a64[~inf]).any():
            return f"output '{name}' has infinities where the reference has none, or the reverse"
        finite = ~(nan | inf)
        diff = float(np.max(np.abs(a64 - e64)[finite], initial=0.0))
        scale = float(np.max(np.abs(e64[finite]), initial=0.0))
        if diff > rtol * scale:
            return f"output '{name}': max abs diff {diff:.3g} at scale {scale:.3g} (> {rtol:g})"
    return None


def feed_dims(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The value of every symbolic input dim in `feeds` (`{"batch": 1, "sequence": 128}`): what a
    backend that compiles for static shapes (tuned TVM) must bind to run these inputs."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        array = feeds.get(value.name or "")
        shape = value.type.shape if isinstance(value.type, TensorType) else None
        if array is None or shape is None or len(shape) != np.ndim(array):
            continue
        for dim, size in zip(shape, np.shape(array), strict=True):
            if isinstance(dim, str):
                dims.setdefault(dim, int(size))
    return dims


def _make(name: str, info: Any) -> tuple[Backend | None, str]:
    try:
        backend = info.load()()
        reason = backend.unavailable()
    except Exception as error:  # ImportError, or a plugin that fails to load
        return None, f"cannot load: {_short(error)}"
    return (backend, "") if reason is None else (None, reason)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text.split(" hint: ")[0]
    return (text[:157] + "...") if len(text) > 160 else text or type(error).__name__


def select_backend(
    model: Model,
    feeds: Mapping[str, np.ndarray],
    *,
    backends: Sequence[str] | None = None,
    threads: int = 2,
    rtol: float = 1e-4,
    expected: Mapping[str, np.ndarray] | None = None,
    warmup: int = 3,
    rounds: int = 20,
    min_rounds: int = 5,
    cutoff: float = 2.0,
    budget_s: float = 60.0,
    slow_first_run_s: float = 1.0,
    compile_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Selection:
    """Compile `model` for each backend (default: every registered one), check it against the
    reference interpreter's outputs on `feeds` (or against `expected`), time the correct ones
    paired and alternating, and return them all with the fastest correct one as `winner`.

    Timing runs `warmup` untimed rounds, then up to `rounds` timed ones; after `min_rounds`,
    candidates over `cutoff` times the fastest median stop being timed, and no new round starts
    once `budget_s` seconds of timing have passed. A candidate whose first (checking) run took
    over `slow_first_run_s` and over `FIRST_RUN_CUTOFF` times the fastest first run is not timed
    further: its one run is its figure. `compile_options` (backend name -> keyword arguments)
    go to that backend's `compile` (`{"tvm": {"tune": 640, "dims": ...}}`). Raises
    `GraphoptError` when the reference interpreter cannot run the model (nothing to check the
    others against).
    """
    registry = all_backends()
    names = list(backends) if backends is not None else list(registry)
    feeds = dict(feeds)
    candidates: list[Candidate] = []
    for name in names:
        candidate = Candidate(name)
        candidates.append(candidate)
        if name not in registry:
            candidate.status, candidate.note = "unavailable", "not a registered backend"
            continue
        backend, reason = _make(name, registry[name])
        if backend is None:
            candidate.status, candidate.note = "unavailable", reason
            continue
        start = time.perf_counter()
        try:
            options = (compile_options or {}).get(name, {})
            candidate.executable = backend.compile(model, threads=threads, **options)
        except Exception as error:  # any backend's failure excludes it, with the reason
            candidate.status, candidate.note = "failed", f"compile: {_short(error)}"
        candidate.compile_s = time.perf_counter() - start

    if expected is None:
        expected = _oracle_outputs(model, feeds, candidates)
    for candidate in candidates:
        if candidate.status != "ok" or candidate.executable is None:
            continue
        try:
            start = time.perf_counter()
            outputs = candidate.executable.run(feeds)
            first_run_ms = (time.perf_counter() - start) * 1e3
        except Exception as error:
            candidate.status, candidate.note = "failed", f"run: {_short(error)}"
            continue
        candidate.first_run_ms = first_run_ms
        problem = compare_outputs(expected, outputs, rtol)
        if problem:
            candidate.status, candidate.note = "wrong", problem

    timed = _without_hopeless([c for c in candidates if c.status == "ok"], slow_first_run_s)
    done = _time(timed, feeds, warmup, rounds, min_rounds, cutoff, budget_s)
    for candidate in timed:
        if candidate.status == "ok" and not candidate.times_ms:
            candidate.status, candidate.note = "failed", candidate.note or "not timed"
    correct = [c for c in candidates if c.status == "ok" and c.times_ms]
    winner = min(correct, key=lambda c: c.median_ms or 0.0) if correct else None
    return Selection(candidates, winner, threads, done)


def _without_hopeless(candidates: list[Candidate], slow_s: float) -> list[Candidate]:
    """The candidates worth timing: not those whose first run took over `slow_s` seconds and over
    `FIRST_RUN_CUTOFF` times the fastest first run. Untuned TVM code runs GPT-2 base for 65 s, and
    the warm-up and `min_rounds` rounds before the median cutoff would cost it 8 minutes. A first
    run carries one-time costs (allocation, lazy compilation: torch's first GPT-2 base run took
    5.3 s, 9x its later ones), hence the wide margin, and only runs long enough for the time to
    matter are judged by one."""
    fastest = min((c.first_run_ms for c in candidates), default=0.0)
    kept = []
    for candidate in candidates:
        first = candidate.first_run_ms
        if first > slow_s * 1e3 and first > FIRST_RUN_CUTOFF * fastest:
            candidate.times_ms = [first]
            candidate.note = _join(
                candidate.note,
                f"timed once ({first / 1e3:.3g} s, {first / fastest:.0f}x the fastest first run)",
            )
        else:
            kept.append(candidate)
    return kept


def _oracle_outputs(
    model: Model, feeds: Mapping[str, np.ndarray], candidates: list[Candidate]
) -> dict[str, np.ndarray]:
    """The reference interpreter's outputs (from its candidate's executable when it is one)."""
    oracle = next((c for c in candidates if c.backend == ORACLE and c.executable), None)
    try:
        if oracle is not None and oracle.executable is not None:
            return oracle.executable.run(feeds)
        from graphopt.backends.reference import Interpreter

        return Interpreter(model).run(feeds)
    except GraphoptError as error:
        raise GraphoptError(
            f"--target auto cannot check the backends: the reference interpreter fails on the "
            f"model: {_short(error)}",
            hint="choose a backend with --target NAME",
        ) from None


def _time(
    timed: list[Candidate],
    feeds: Mapping[str, np.ndarray],
    warmup: int,
    rounds: int,
    min_rounds: int,
    cutoff: float,
    budget_s: float,
) -> int:
    """Time the candidates paired, in shuffled rounds (`graphopt.backends.timing`); a candidate
    that fails to run is marked failed, one cut for slowness says so. Returns the rounds timed."""
    by_label = {str(i): c for i, c in enumerate(timed)}
    paired = time_paired(
        {label: partial(c.executable.run, feeds) for label, c in by_label.items()},  # type: ignore[union-attr]
        rounds=rounds, warmup=max(warmup - 1, 0),  # the checking run was the first warm-up
        min_rounds=min_rounds, cutoff=cutoff, budget_s=budget_s, catch=True,
    )  # fmt: skip
    for label, candidate in by_label.items():
        candidate.times_ms = paired.times_ms[label]
        if label in paired.failed:
            candidate.status, candidate.note = "failed", f"run: {_short(paired.failed[label])}"
        elif label in paired.cut:
            candidate.note = _join(
                candidate.note,
                f"stopped after {paired.cut[label]} runs (> {cutoff:g}x the fastest)",
            )
    return paired.rounds


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def artifact_path(backend: str, executable: Executable | None, path: str) -> str:
    """`path` with the extension of the file `backend` writes (`model.onnx` -> `model.xml` for
    openvino); unchanged for a backend whose artifact is unknown."""
    suffix = getattr(executable, "artifact_suffix", None) or ARTIFACT_SUFFIXES.get(backend)
    if not suffix or path.endswith(suffix):
        return path
    root, ext = os.path.splitext(path)
    return (root if ext else path) + suffix


def save_artifact(
    candidate: Candidate, model: Model, path: str, *, external_data: bool | None = None
) -> list[str]:
    """Write the candidate's artifact at `artifact_path(...)`: `Executable.save`, or the model as
    ONNX (`external_data` as in `graphopt.save`) for a backend with nothing of its own to save
    (the reference interpreter). ONNX Runtime's artifact is the ONNX model too. Returns the files
    written, the main one first."""
    executable = candidate.executable
    if executable is None:
        raise BackendError(f"backend '{candidate.backend}' has no compiled model to save")
    target = artifact_path(candidate.backend, executable, path)
    if type(executable).save is Executable.save or target.endswith(".onnx"):
        from graphopt.backends.onnx import save_onnx

        save_onnx(model, target, external_data=external_data)
        return [target] + ([target + ".data"] if os.path.exists(target + ".data") else [])
    return executable.save(target)


def compile_and_save(
    model: Model,
    target: str,
    path: str,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    threads: int = 2,
    external_data: bool | None = None,
    backends: Sequence[str] | None = None,
    compile_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[str], Selection | None]:
    """What `graphopt optimize --target NAME|auto -o PATH` does after the passes: compile `model`
    with backend `target` (for `auto`, the winner of `select_backend` on `feeds` among `backends`,
    default all; `compile_options` as there) and write its artifact. Returns the files written
    and, for `auto`, the selection."""
    selection = None
    if target == "auto":
        if feeds is None:
            raise BackendError("--target auto needs inputs to check and time the backends on")
        selection = select_backend(
            model, feeds, threads=threads, backends=backends, compile_options=compile_options
        )
        if selection.winner is None:
            reasons = "; ".join(f"{c.backend}: {c.note}" for c in selection.candidates)
            raise BackendError(f"no backend ran the model correctly ({reasons})")
        candidate = selection.winner
    else:
        from graphopt.backends.base import get_backend

        options = (compile_options or {}).get(target, {})
        candidate = Candidate(
            target, executable=get_backend(target).compile(model, threads=threads, **options)
        )
    return save_artifact(candidate, model, path, external_data=external_data), selection
