"""Build, export and cache the zoo's models; sample inputs and torch reference outputs.

`build(name, folder, size, exporter)` returns the path of an ONNX file exported from a model with
random, seeded weights (nothing is downloaded). The file name carries a content key: a hash of
the model's hyper-parameters and options, the exporter and opset, the torch / transformers /
onnxscript versions, and the source of this package's builder modules. A second call with the
same key finds the file and returns at once, without importing torch. Files are written to a temp
name in `folder` and renamed into place, so a crash or a concurrent build never leaves a partial
file under the final name.

Exporters (`torch.onnx.export`):

- `"dynamo"` (default): `dynamo=True`, opset 18, `dynamic_shapes` with `torch.export.Dim`s named
  batch and sequence, onnxscript's optimizer on (the exporter's default), weights inline.
- `"torchscript"`: `dynamo=False`, opset 17, `dynamic_axes` naming the same dims, constant
  folding on (the default). It folds BatchNorm into Conv.

Both work for every zoo model at both sizes with its default options (checked: import,
verify, ONNX Runtime vs torch within 1e-6 relative). The one failing combination is TorchScript
with a decoder LM built with `attention_mask=False` (transformers then calls `torch.diff`, which
has no TorchScript ONNX symbolic; see `hf.py`): `build` raises `UnsupportedExport` for it before
exporting anything. TorchScript also writes GPT-2's tied LM head as a second copy of the
embedding (base: 622 MB against dynamo's 476 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .specs import DEFAULT_OPSET, EXPORTERS, ModelSpec, concrete_shape, get_spec

FORMAT = 1  # bump to invalidate every cached file when the key's meaning changes
CACHE_ENV = "GRAPHOPT_MODEL_CACHE"
DEFAULT_CACHE = "~/.cache/graphopt-models"
# The exporters trace batch 2 x sequence 8 (0 and 1 would be specialised by torch.export); the
# torch reference saved beside each model uses other sizes, so that tests exercise the symbols.
EXPORT_BATCH, EXPORT_SEQUENCE = 2, 8
REFERENCE_BATCH, REFERENCE_SEQUENCE = 3, 11
_HERE = Path(__file__).resolve().parent


def default_cache_dir() -> Path:
    """`$GRAPHOPT_MODEL_CACHE` when set, else `~/.cache/graphopt-models` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


class UnsupportedExport(ValueError):
    """This model (with these options) cannot be exported with this exporter; says why."""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def _resolve(
    name: str, size: str, exporter: str, opset: int | None, options: Mapping[str, Any]
) -> tuple[ModelSpec, dict[str, Any], int]:
    spec = get_spec(name)
    if exporter not in EXPORTERS:
        raise ValueError(f"no exporter {exporter!r}; exporters: {list(EXPORTERS)}")
    return spec, spec.config(size, options), opset or DEFAULT_OPSET[exporter]


def cache_key(
    name: str, size: str = "tiny", exporter: str = "dynamo", *, opset: int | None = None,
    optimize: bool = True, **options: Any,
) -> str:  # fmt: skip
    """The content key of a build: 16 hex digits of a SHA-256 over what decides the file."""
    spec, config, opset = _resolve(name, size, exporter, opset, options)
    sources = hashlib.sha256()
    for module in ("specs.py", "zoo.py", f"{spec.builder}.py"):
        sources.update((_HERE / module).read_bytes())
    content = {
        "format": FORMAT, "model": name, "size": size, "exporter": exporter, "opset": opset,
        "optimize": optimize, "config": config, "sources": sources.hexdigest(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "onnxscript")},
    }  # fmt: skip
    text = json.dumps(content, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_path(
    name: str, folder: str | os.PathLike[str] | None = None, size: str = "tiny",
    exporter: str = "dynamo",
    *, opset: int | None = None, optimize: bool = True, **options: Any,
) -> Path:  # fmt: skip
    """Where `build` puts (or finds) this model; the file may not exist yet."""
    key = cache_key(name, size, exporter, opset=opset, optimize=optimize, **options)
    raw = "" if optimize else "-raw"
    return Path(folder or default_cache_dir()) / f"{name}-{size}-{exporter}{raw}-{key}.onnx"


def build(
    name: str, folder: str | os.PathLike[str] | None = None, size: str = "tiny",
    exporter: str = "dynamo",
    *, opset: int | None = None, optimize: bool = True, **options: Any,
) -> Path:  # fmt: skip
    """Export zoo model `name` at `size` into `folder` (cached by content key); its path.

    `folder` defaults to `default_cache_dir()`, the cache the tests use.
    `optimize=False` turns off the exporter's own graph clean-up (dynamo: onnxscript's optimizer;
    TorchScript: constant folding, which also folds BatchNorm into Conv): the raw export, with
    the redundancy clean-up passes exist to remove. `options` are the model's build options
    (`specs.MODELS[name].options`), e.g. `attention_mask=False` for the decoder LMs.
    Raises `UnsupportedExport` for a combination the exporter cannot handle, `ImportError` when
    torch or transformers is missing.
    """
    spec, config, opset = _resolve(name, size, exporter, opset, options)
    path = cached_path(name, folder, size, exporter, opset=opset, optimize=optimize, **options)
    if path.exists():
        return path
    if exporter == "torchscript":
        problem = spec.torchscript_problem(config)
        if problem:
            raise UnsupportedExport(problem)
    module = torch_module(name, size, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = _sample(spec, config, REFERENCE_BATCH, REFERENCE_SEQUENCE, seed=0)
    arrays = {f"input/{k}": v for k, v in feeds.items()}
    arrays.update({f"output/{k}": v for k, v in _run(module, spec, config, feeds).items()})
    savez: Any = np.savez  # numpy's stub reads `**arrays` as its `allow_pickle` flag
    _write_atomically(reference_path(path), lambda temp: savez(temp, **arrays))  # first: a
    # model file in the cache always has its reference beside it
    _write_atomically(
        path, lambda temp: _export(module, spec, config, exporter, opset, optimize, temp)
    )
    return path


def _write_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """`write(temp)` into a temp file beside `path`, then rename it into place."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def reference_path(path: str | os.PathLike[str]) -> Path:
    """The `.torch.npz` file `build` writes beside a model: sample inputs and torch's outputs."""
    return Path(path).with_suffix(".torch.npz")


def torch_reference(
    path: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, outputs) saved beside the built model `path`: the default-seed sample inputs at
    batch 3, sequence 11 (not the traced 2 x 8, so dynamic dims are exercised) and the torch
    module's outputs on them, in graph order. Lets tests check a cached model without torch."""
    with np.load(reference_path(path)) as saved:
        arrays = {key: saved[key] for key in saved.files}
    inputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
    outputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("output/")}
    return inputs, outputs


def _builder(spec: ModelSpec) -> Any:
    try:
        return importlib.import_module(f"{__package__}.{spec.builder}")
    except ImportError as error:
        raise ImportError(
            f"building zoo model {spec.name!r} needs torch and transformers ({error.name} is"
            " missing): pip install 'graphopt[torch]'",
            name=error.name,
        ) from error


def torch_module(name: str, size: str = "tiny", **options: Any) -> Any:
    """The zoo model as a `torch.nn.Module` in eval mode, weights seeded: the same module every
    call. Its `forward` takes the graph inputs in order and returns a tuple of the outputs."""
    spec = get_spec(name)
    with _quiet():
        return _builder(spec).BUILDERS[name](spec.config(size, options))


def sample_inputs(
    name: str, size: str = "tiny", *, batch: int = 2, sequence: int = 16, seed: int = 0,
    **options: Any,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Inputs for the model, name -> numpy array of the graph's dtype (int64 ids and masks).

    Token ids are uniform over the vocabulary; the attention mask is all ones except the last
    quarter of the second row (right padding); images are standard normal. Needs no torch.
    """
    spec = get_spec(name)
    return _sample(spec, spec.config(size, options), batch, sequence, seed)


def _sample(
    spec: ModelSpec, config: Mapping[str, Any], batch: int, sequence: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for item in spec.active_inputs(config):
        shape = concrete_shape(item, config, batch, sequence)
        if item.kind == "ids":
            feeds[item.name] = rng.integers(0, config[item.high], shape, dtype=item.dtype)
        elif item.kind == "mask":
            mask = np.ones(shape, dtype=item.dtype)
            if shape[0] > 1:
                mask[1, shape[1] - max(1, shape[1] // 4) :] = 0
            feeds[item.name] = mask
        else:
            feeds[item.name] = rng.standard_normal(shape).astype(item.dtype)
    return feeds


def torch_outputs(
    name: str, feeds: Mapping[str, np.ndarray], size: str = "tiny", **options: Any
) -> dict[str, np.ndarray]:
    """The torch module's own outputs on `feeds` (output name -> array): the ground truth."""
    spec = get_spec(name)
    config = spec.config(size, options)
    return _run(torch_module(name, size, **options), spec, config, feeds)


def _run(
    module: Any, spec: ModelSpec, config: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    import torch

    arguments = [torch.from_numpy(np.asarray(feeds[i.name])) for i in spec.active_inputs(config)]
    with torch.no_grad():
        results = module(*arguments)
    return {o.name: r.numpy() for o, r in zip(spec.outputs, results, strict=True)}


def _export(
    module: Any, spec: ModelSpec, config: Mapping[str, Any], exporter: str, opset: int,
    optimize: bool, path: str,
) -> None:  # fmt: skip
    import torch

    inputs = spec.active_inputs(config)
    example = _sample(spec, config, EXPORT_BATCH, EXPORT_SEQUENCE, seed=0)
    arguments = tuple(torch.from_numpy(example[i.name]) for i in inputs)
    common: dict[str, Any] = {
        "input_names": [i.name for i in inputs],
        "output_names": [o.name for o in spec.outputs],
        "opset_version": opset,
        "verbose": False,
    }
    symbols = ("batch", "sequence")
    with _quiet():
        if exporter == "dynamo":
            limit = config[spec.sequence_limit] if spec.sequence_limit else None
            dims = {
                "batch": torch.export.Dim("batch"),
                "sequence": torch.export.Dim("sequence", max=limit),
            }
            shapes = {
                i.name: {axis: dims[d] for axis, d in enumerate(i.shape) if d in symbols}
                for i in inputs
            }
            torch.onnx.export(
                module, arguments, path, dynamo=True, dynamic_shapes=shapes, external_data=False,
                optimize=optimize, **common,
            )  # fmt: skip
        else:
            axes = {i.name: {a: d for a, d in enumerate(i.shape) if d in symbols} for i in inputs}
            axes.update({o.name: dict(enumerate(o.dims)) for o in spec.outputs})
            torch.onnx.export(
                module, arguments, path, dynamo=False, dynamic_axes=axes,
                do_constant_folding=optimize, **common,
            )  # fmt: skip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and transformers' warnings and log lines while building."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "transformers")]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
