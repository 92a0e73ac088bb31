"""The `tvm` backend: IR -> Relax (`tvm_lower`) -> a compiled library for llvm, aarch64 or cuda.

    executable = get_backend("tvm").compile(model, "llvm", tune=2000, tuning_dir="m.tuning")
    executable.run({"input_ids": ids})
    executable.save("model.so")         # model.so + model.json (inputs, outputs, target)
    load_library("model.so").run(...)   # what `graphopt run model.so` does

Targets (TVM 0.27 takes target dicts, not flag strings):

- `llvm` (host CPU; `llvm:native` sets `mcpu` to this machine's CPU, `llvm:<cpu>` to another),
- `aarch64` (64-bit ARM with NEON, cross-compiled with Debian's `aarch64-linux-gnu-g++` into a
  shared library for an ARM board; `remote="host:port"` runs it through a TVM RPC server, such
  as the emulated one `tools/arm_emulation.sh` starts),
- `cuda` (`cuda:sm_80` etc., `sm_90` by default: CUDA source compiled by nvcc; it runs only where
  TVM has a CUDA runtime, which the PyPI wheel has not, and the artifact is written anyway).

Each target is compiled with TVM's own pipeline for it (`relax.get_default_pipeline`: legalize,
fuse, and dlight default schedules on GPUs). Untuned CPU code is plain loops, one thread: 100-300x
slower than ONNX Runtime. `tune=N` runs MetaSchedule with N trials over the fused kernels and keeps
its database in `tuning_dir` (the command line puts it next to the output); a later compile of the
same kernels finds their records there and tunes only what is missing, or, asked for more trials
than the database was tuned with, tunes every kernel for the difference (the search starts from
the records' best schedules). Weights are constants marked layout-free, so a tuned kernel may
read its weight in a packed layout of its own choosing; the packing runs once, at compile time,
and the library stores the packed weights (`_compile_tuned`). Tuning needs static shapes:
symbolic dims are bound with `dims={"batch": 1, "sequence": 128}` (unbound ones become 1).

Nodes the lowering does not cover make `compile` fail with an error naming them, unless
`fallback="onnxruntime"` (or `"reference"`): then the graph is split (`backends/partition.py`) and
those parts run on that backend. tvm is imported only inside the functions that need it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, register_backend
from graphopt.ir.core import Model, Node
from graphopt.ir.types import TensorType

__all__ = [
    "TvmBackend",
    "TvmExecutable",
    "TargetSpec",
    "is_library",
    "library_signature",
    "load_library",
    "parse_target",
]

Progress = Callable[[str, int, int], None]  # (stage, done, total)
FORMAT = "graphopt-tvm/1"


def _usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def import_tvm() -> Any:
    """`import tvm`, without the `import torch` that tvm_ffi does on the way when torch is
    installed (2-9 s here, for DLPack interop graphopt does not use). torch imports normally
    afterwards.

    TVM's worker threads spin-wait after each parallel region by default; they would steal the
    cores from whatever runs next in the process (another backend timed beside it by `--target
    auto`, the caller's own work). Like graphopt's ONNX Runtime sessions they sleep instead,
    unless the user set `TVM_THREAD_POOL_SPIN_COUNT` (read when the thread pool starts).

    TVM sizes its thread pool once, when it starts, at `TVM_NUM_THREADS`, or else at half the
    hardware threads on x86 (it assumes two hyper-threads per core): one thread on a 2-vCPU
    machine, whatever `threads` asks for later, since `runtime.config_threadpool` only narrows
    the pool. graphopt sizes it at the CPUs this process may run on (unless the user set
    `TVM_NUM_THREADS`), and `threads` narrows it; MetaSchedule's measuring workers inherit the
    setting, so kernels are tuned with the threads they run with."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ.setdefault("TVM_NUM_THREADS", str(_usable_cpus()))
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm
    finally:
        del sys.modules["torch"]
    return tvm


# ----- targets -----------------------------------------------------------------------------------
@dataclass
class TargetSpec:
    """A parsed target: its name (`llvm`, `aarch64`, `cuda`) and TVM's target dict."""

    name: str
    config: dict[str, Any]

    @property
    def is_gpu(self) -> bool:
        return self.name == "cuda"

    def tvm_target(self) -> Any:
        import tvm

        return tvm.target.Target(self.config)


def parse_target(target: str | None, *, threads: int | None = None) -> TargetSpec:
    """`llvm` (default), `llvm:native`, `llvm:<mcpu>`, `aarch64`, `cuda`, `cuda:sm_80`; a
    leading `tvm:` is allowed (the command line's form)."""
    text = (target or "llvm").removeprefix("tvm:").removeprefix("tvm")
    kind, _, option = (text or "llvm").partition(":")
    cores = threads or os.cpu_count() or 1
    if kind in ("llvm", "cpu", "host"):
        config: dict[str, Any] = {"kind": "llvm", "num-cores": cores}
        if option:
            if option == "native":
                from tvm.target import codegen

                option = codegen.llvm_get_system_cpu()
            config["mcpu"] = option
        return TargetSpec("llvm", config)
    if kind in ("aarch64", "arm", "arm64"):
        config = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        config["num-cores"] = threads or 4
        if option:
            config["mcpu"] = option
        return TargetSpec("aarch64", config)
    if kind == "cuda":
        arch = option or "sm_90"
        if not arch.startswith("sm_"):
            raise BackendError(f"bad CUDA arch '{arch}'", hint="write tvm:cuda:sm_80, sm_90, ...")
        return TargetSpec("cuda", {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    raise BackendError(
        f"unknown tvm target '{target}'",
        hint="targets: llvm, llvm:native, aarch64, cuda, cuda:sm_80 (as --target tvm:llvm etc.)",
    )


# ----- compiling ---------------------------------------------------------------------------------
@dataclass
class CompileInfo:
    """What a compile did, for reports: seconds per stage and the tuning database's use."""

    lower_s: float = 0.0
    tune_s: float = 0.0
    build_s: float = 0.0
    trials: int = 0
    tasks: int = 0
    tasks_tuned: int = 0
    tuning_dir: str | None = None
    prepacked: int = 0  # tuned kernels that read their weights in a layout packed at compile time
    notes: list[str] = field(default_factory=list)


def _fuse_passes(target: Any) -> list[Any]:
    from tvm import relax

    return [*_dispatch_and_fast_math(target), *relax.pipeline.legalize_passes(target)]


def _dispatch_and_fast_math(target: Any) -> list[Any]:
    """TVM's library dispatch passes for `target` (sort, scan and sampling ops are theirs to
    lower), then `_fast_math`, which legalizes the rest: the start of every CPU compile."""
    from tvm import relax

    return [*relax.pipeline.library_dispatch_passes(target), _fast_math()]


def _fast_math() -> Any:
    """`LegalizeOps` lowering tanh and erf to TVM's float32 approximations (`topi.fast_tanh`,
    `topi.fast_erf`: within 4e-7 of tanh and erf; other dtypes keep the exact functions) and
    every other op as usual. The LLVM targets otherwise call libm's tanhf or erff once per
    element, unvectorized: GPT-2 base's tanh-GELU took 1.4 ms per layer that way even tuned (11%
    of the tuned model), 78 us with the approximation. CPU targets only
    (`_dispatch_and_fast_math`)."""
    from tvm import relax, te, tirx, topi

    def fast_erf(x: Any) -> Any:  # topi.fast_erf, but NaN stays NaN (it maps NaN to 1)
        y = topi.fast_erf(x)
        return te.compute(
            x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), y(*i)), name="erf"
        )

    return relax.transform.LegalizeOps(
        customize_legalize_map={
            "relax.tanh": lambda bb, call: bb.call_te(topi.fast_tanh, call.args[0]),
            "relax.erf": lambda bb, call: bb.call_te(fast_erf, call.args[0]),
        }
    )


def build_relax(
    mod: Any, spec: TargetSpec, *, tune: int = 0, tuning_dir: str | None = None,
    progress: Progress | None = None, info: CompileInfo | None = None,
) -> Any:  # fmt: skip
    """Compile a Relax module for `spec` (tuning first when `tune` > 0); returns TVM's
    `VMExecutable`."""
    import tvm
    from tvm import relax

    info = info or CompileInfo()
    target = spec.tvm_target()
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # the wheel has no NVRTC bindings
    if tune and spec.is_gpu:
        info.notes.append("cuda: no GPU to measure on here; dlight default schedules are used")
        tune = 0
    if tune and spec.name == "aarch64":
        info.notes.append("aarch64: tuning needs the board (timings under emulation mean nothing)")
        tune = 0
    if not tune:
        start = time.perf_counter()
        if not spec.is_gpu:  # tanh and erf approximated; the default pipeline does the rest
            with target:
                mod = tvm.transform.Sequential(_dispatch_and_fast_math(target))(mod)
        executable = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
        info.build_s = time.perf_counter() - start
        return executable

    with target:
        # weights are relax constants: marking them layout-free lets MetaSchedule pick each
        # kernel's weight layout (packed tiles the inner loops read in order), paid once below
        fused = tvm.transform.Sequential(
            [*_channels_last(mod), *_fuse_passes(target),
             relax.transform.AttachAttrLayoutFreeBuffers()]
        )(mod)  # fmt: skip
    tuning_dir = tuning_dir or tempfile.mkdtemp(prefix="graphopt-tvm-tuning-")
    database = _tune(fused, target, tuning_dir, tune, progress, info)
    start = time.perf_counter()
    executable = _compile_tuned(fused, database, target, info)
    info.build_s = time.perf_counter() - start
    return executable


def _channels_last(mod: Any) -> list[Any]:
    """Convolutions in NHWC for tuning on a CPU: output channels innermost, so a tuned kernel
    vectorizes over them against a packed weight, the loop nest MetaSchedule tunes well for
    MatMuls (NCHW leaves it vectorizing over pixels). `ConvertLayout` keeps the model's inputs and
    outputs in NCHW (one transpose each way) and carries NHWC through the elementwise ops, pools
    and residual Adds between. Grouped convolutions stay as they are: none is converted then."""
    from tvm import relax

    convs = _calls(mod, "relax.nn.conv2d")
    if not convs or any(int(call.attrs.groups) != 1 for call in convs):
        return []
    return [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})]


def _calls(mod: Any, op_name: str) -> list[Any]:
    """Every Relax call of the operator `op_name` (e.g. "relax.nn.conv2d") in `mod`'s functions."""
    from tvm import relax

    found: list[Any] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == op_name:
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _compile_tuned(fused: Any, database: Any, target: Any, info: CompileInfo) -> Any:
    """Build the fused module with the database's schedules. A tuned kernel that chose another
    weight layout starts with a layout-rewrite block: `SplitLayoutRewritePreproc` moves it into a
    function of its own on the weight, and `FoldConstant` runs that on the constant at compile
    time, so the library stores the weights pre-packed and no call repacks them (ONNX Runtime
    prepacks its MatMul weights at session start the same way)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    with target, database, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(
            [
                relax.transform.MetaScheduleApplyDatabase(),
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                relax.transform.DeadCodeElimination(),
            ]
        )(fused)
    names = [g.name_hint for g in mod.functions]
    info.prepacked = sum(name.endswith("_prepacked") for name in names)
    left = [name for name in names if name.endswith("_weight_prepack")]
    if left:  # a weight that is not a constant (a fallback's input): repacked on every call
        info.notes.append(f"tuning: {len(left)} weight layout rewrites run on every call")

    @tvm.transform.module_pass(opt_level=0)
    def lower(module: Any, _ctx: Any) -> Any:
        with target:
            passes = dataflow_lower_passes(target) + finalize_passes(target)
            return tvm.transform.Sequential(passes)(module)

    return tvm.compile(mod, target, relax_pipeline=lower)


def _tune(
    fused: Any, target: Any, work_dir: str, trials: int, progress: Progress | None,
    info: CompileInfo,
) -> Any:  # fmt: skip
    """Tune the fused kernels that the database in `work_dir` has no record for, or all of them
    for the difference when `trials` is more than the database was tuned with."""
    absent = [m for m in ("xgboost", "cloudpickle", "psutil") if importlib.util.find_spec(m) is None]  # fmt: skip  # noqa: E501
    if absent:
        raise BackendError(
            f"tuning needs {', '.join(absent)}, which are not installed",
            hint="pip install 'apache-tvm[meta-schedule,popen-pool]', or compile with tune=0",
        )
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(work_dir, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")
    tasks = ms.relax_integration.extract_tasks(fused, target)
    missing = [
        t for t in tasks if database.query_tuning_record(t.dispatched[0], target, "main") is None
    ]
    done = _trials_done(work_dir)
    if not missing and trials <= done:
        info.tasks = len(tasks)
        info.tuning_dir = work_dir
        info.notes.append(f"tuning: all {len(tasks)} kernels found in {work_dir} ({done} trials)")
        return database
    # more trials than the database was tuned with: tune every kernel again for the difference
    # (the search starts from the database's best schedules); else only the kernels it lacks
    top_up = trials > done
    chosen = tasks if top_up else missing
    budget = trials - done if top_up else trials
    info.tasks, info.tasks_tuned, info.tuning_dir = len(tasks), len(chosen), work_dir
    # MetaSchedule sets up its loggers here: its console handler takes this logger's level then
    # (the file handlers in `<work_dir>/logs` keep DEBUG), so its per-batch tables stay off
    # stdout (the bench's JSON lines); it leaves the level at DEBUG, hence set on every tune
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    # it also lists the handlers this logger already has by name, and fails on one without a
    # name ("'NoneType' object has no attribute 'format'", seen on a second tune in one
    # process): start from no handlers, as a fresh process does; it adds its own again
    for handler in list(ms_logger.handlers):
        ms_logger.removeHandler(handler)
        handler.close()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        chosen, work_dir, num_threads=int(target.attrs.get("num-cores", 1))
    )
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    if progress is not None:
        callbacks.append(_progress_callback(progress, budget))
    start = time.perf_counter()
    ms.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=budget,
        num_trials_per_iter=min(64, max(8, budget // max(1, len(chosen)))),
        database=database, measure_callbacks=callbacks,
        builder=ms.builder.LocalBuilder(f_build=_build_kernel),
    )  # fmt: skip
    info.tune_s = time.perf_counter() - start
    info.trials = budget
    if top_up and done:
        info.notes.append(f"tuning: {done} trials in {work_dir}, {budget} more to reach {trials}")
    _record_trials(work_dir, max(done, trials))
    return database


TRIALS_FILE = "graphopt_trials.json"  # in the tuning directory: the trials it was tuned with


def _trials_done(work_dir: str) -> int:
    """The trials the database in `work_dir` was tuned with (0: unknown, e.g. TVM's own)."""
    try:
        with open(os.path.join(work_dir, TRIALS_FILE)) as f:
            return int(json.load(f)["trials"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _record_trials(work_dir: str, trials: int) -> None:
    with open(os.path.join(work_dir, TRIALS_FILE), "w") as f:
        json.dump({"trials": trials}, f)


def _build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """Build one tuning candidate in a MetaSchedule worker: TVM's default build without its
    `import tvm.s_tir.tensor_intrin`, which parses every CUDA intrinsic and takes about 40 s on
    this machine. MetaSchedule starts fresh build workers for every batch of candidates, so that
    import used to cost 40 s per batch (most of the tuning time). The candidates arrive already
    scheduled, tensorized blocks included, so nothing in the build needs the registry."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def _progress_callback(progress: Progress, total: int) -> Any:
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.utils import derived_object

    @derived_object
    class _Progress(PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0

        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, *results: Any) -> None:
            self.done += len(candidates)
            progress("tune", min(self.done, total), total)

    return _Progress()


# ----- executables -------------------------------------------------------------------------------
def _signature(model: Model, dims: Mapping[str, int]) -> dict[str, list[dict[str, Any]]]:
    def describe(name: str, value: Any) -> dict[str, Any]:
        t = value.type
        dtype = str(np.dtype(t.dtype.numpy)) if isinstance(t, TensorType) else "unknown"
        shape = None
        if isinstance(t, TensorType) and t.shape is not None:
            shape = [dims.get(d, d) if isinstance(d, str) else d for d in t.shape]
        return {"name": name, "dtype": dtype, "shape": shape}

    graph = model.graph
    inputs = [describe(v.name or "", v) for v in graph.inputs if v.const_value is None]
    outputs = [describe(n, v) for n, v in zip(graph.output_names, graph.outputs, strict=True)]
    return {"inputs": inputs, "outputs": outputs}


class TvmExecutable(Executable):
    """A compiled Relax VM program: runs on the host CPU, or on an RPC session's device."""

    def __init__(
        self, executable: Any, spec: TargetSpec, meta: dict[str, Any], *,
        remote: str | None = None, threads: int | None = None, info: CompileInfo | None = None,
    ):  # fmt: skip
        self.executable = executable  # a VMExecutable (fresh compile) or a loaded module
        self.spec = spec
        self.meta = meta
        self.info = info or CompileInfo()
        self.input_names = [i["name"] for i in meta["inputs"]]
        self.output_names = [o["name"] for o in meta["outputs"]]
        self.remote = remote
        self.threads = threads
        self._vm: Any = None
        self._device: Any = None

    def _prepare(self) -> None:
        import tvm
        from tvm import relax

        if self._vm is not None:
            return
        if self.remote:
            self._vm, self._device = _remote_vm(self.executable, self.spec, self.remote)
            return
        if self.spec.name == "aarch64":
            raise BackendError(
                "this library is built for aarch64 and cannot run on this machine",
                hint="run it on an ARM board, or through the emulated RPC server of "
                "tools/arm_emulation.sh (remote='127.0.0.1:9190')",
            )
        if self.spec.is_gpu:
            if not tvm.runtime.enabled("cuda"):
                raise BackendError(
                    "this TVM has no CUDA runtime: the CUDA library cannot run here",
                    hint="run it where TVM is built with CUDA (the artifact is complete)",
                )
            self._device = tvm.cuda(0)
        else:
            self._device = tvm.cpu()
            if self.threads:
                tvm.get_global_func("runtime.config_threadpool")(0, self.threads)
        self._vm = relax.VirtualMachine(self.executable, self._device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        self._prepare()
        args = []
        for spec in self.meta["inputs"]:
            name = spec["name"]
            if name not in inputs:
                raise BackendError(f"missing input '{name}'", hint=f"inputs: {self.input_names}")
            array = np.ascontiguousarray(inputs[name])
            if str(array.dtype) != spec["dtype"]:
                raise BackendError(f"input '{name}' is {array.dtype}, expected {spec['dtype']}")
            args.append(tvm.runtime.tensor(array, self._device))
        try:
            if self.remote:  # a tuple cannot cross RPC: the VM's stateful calls fetch one by one
                self._vm.set_input("main", *args)
                self._vm.invoke_stateful("main")
                results = self._vm.get_outputs("main")
            else:
                results = self._vm["main"](*args)
        except Exception as error:  # TVM checks shapes at the call: a wrong dim lands here
            raise BackendError(f"the tvm library failed to run: {error}") from None
        return {name: results[i].numpy() for i, name in enumerate(self.output_names)}

    def save(self, path: str) -> list[str]:
        """Write the library to `path` and its signature to `<stem>.json`; for cuda also the
        CUDA source (`<stem>.cu`)."""
        if not hasattr(self.executable, "export_library"):
            raise BackendError("only a freshly compiled library can be saved")
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        temp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}.so")
        try:
            if self.spec.name == "aarch64":
                self.executable.export_library(temp, fcompile=_cross_compiler())
            else:
                self.executable.export_library(temp)
            os.replace(temp, path)
        except Exception as error:
            if os.path.exists(temp):
                os.unlink(temp)
            raise BackendError(f"cannot write the library: {error}", where=path) from None
        written = [path]
        if self.spec.is_gpu:
            source = cuda_source(self.executable)
            if source:
                written.append(_write_text(os.path.splitext(path)[0] + ".cu", source))
        meta = dict(self.meta, library=os.path.basename(path))
        written.append(_write_text(json_path(path), json.dumps(meta, indent=2) + "\n"))
        return written


def _write_text(path: str, text: str) -> str:
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)
    return path


def _cross_compiler() -> Any:
    from tvm.support import cc

    return cc.cross_compiler(
        "aarch64-linux-gnu-g++",
        get_target_triple=cc.get_target_by_dump_machine("aarch64-linux-gnu-gcc"),
    )


def cuda_source(executable: Any) -> str:
    """The CUDA source TVM generated for a cuda executable ('' if there is none)."""
    modules = [executable.mod]
    while modules:
        module = modules.pop()
        if module.kind == "cuda":
            return str(module.inspect_source(""))
        modules.extend(module.imports)
    return ""


def _remote_vm(executable: Any, spec: TargetSpec, remote: str) -> tuple[Any, Any]:
    """Upload the library to a TVM RPC server at `host:port` and open a VM there."""
    from tvm import relax, rpc

    host, _, port = remote.rpartition(":")
    try:
        session = rpc.connect(host or "127.0.0.1", int(port))
    except Exception as error:
        raise BackendError(
            f"cannot reach the TVM RPC server at {remote}: {error}",
            hint="start one (tools/arm_emulation.sh start) or check host:port",
        ) from None
    if isinstance(executable, str):  # a library path
        library = executable
        session.upload(library)
    else:  # exported to a temporary folder, removed once uploaded
        with tempfile.TemporaryDirectory(prefix="graphopt-tvm-") as folder:
            library = os.path.join(folder, "model.so")
            kwargs = {"fcompile": _cross_compiler()} if spec.name == "aarch64" else {}
            executable.export_library(library, **kwargs)
            session.upload(library)
    module = session.load_module(os.path.basename(library))
    device = session.cpu()
    return relax.VirtualMachine(module, device), device


# ----- loading saved libraries -------------------------------------------------------------------
def json_path(library: str | os.PathLike[str]) -> str:
    return os.path.splitext(os.fspath(library))[0] + ".json"


def is_library(path: Any) -> bool:
    """Whether `path` names a library this backend wrote (`.so` with its JSON beside it)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    return path.endswith(".so") and os.path.exists(json_path(path))


def _read_meta(path: str) -> dict[str, Any]:
    try:
        with open(json_path(path), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise BackendError(f"cannot read {json_path(path)}: {error}", where=path) from None
    if meta.get("format") != FORMAT:
        raise BackendError(f"{json_path(path)} is not a graphopt tvm signature", where=path)
    return dict(meta)


def library_signature(path: str | os.PathLike[str]) -> Model:
    """A model with only the library's inputs (typed), for making feeds."""
    from graphopt.ir.core import Graph
    from graphopt.ir.types import DType

    meta = _read_meta(os.fspath(path))
    graph = Graph("library")
    for spec in meta["inputs"]:
        shape = None if spec["shape"] is None else tuple(spec["shape"])
        graph.add_input(spec["name"], TensorType(DType.from_numpy(np.dtype(spec["dtype"])), shape))
    return Model(graph)


def load_library(
    path: str | os.PathLike[str], *, remote: str | None = None, threads: int | None = None
) -> Executable:
    """The executable in a library written by `save` (a split model's JSON also works)."""
    path = os.fspath(path)
    meta = _read_meta(path)
    if "segments" in meta:
        from graphopt.backends.partition import load_partitioned

        return load_partitioned(path, meta, remote=remote, threads=threads)
    spec = TargetSpec(meta["target"], meta["target_config"])
    remote = remote or os.environ.get("GRAPHOPT_TVM_REMOTE") or None
    if remote:
        return TvmExecutable(path, spec, meta, remote=remote)
    if spec.name != "llvm":
        return TvmExecutable(None, spec, meta)  # fails with the reason when run
    module = import_tvm().runtime.load_module(path)
    return TvmExecutable(module, spec, meta, threads=threads)


# ----- the backend -------------------------------------------------------------------------------
@register_backend
class TvmBackend(Backend):
    name = "tvm"
    description = "Apache TVM: IR lowered to Relax, compiled for llvm, aarch64 or cuda"
    targets = ("llvm", "aarch64", "cuda")

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("tvm") is None:
            return "the apache-tvm package is not installed (pip install 'graphopt[tvm]')"
        return None

    def supports(self, node: Node, opset: int) -> bool:
        from graphopt.backends.tvm_lower import supported_ops

        return node.op in supported_ops() and not node.has_subgraphs

    def compile(
        self, model: Model, target: str | None = None, *, tune: int = 0,
        tuning_dir: str | None = None, dims: Mapping[str, int] | None = None,
        fallback: str | None = None, remote: str | None = None, threads: int | None = None,
        progress: Progress | None = None, **options: Any,
    ) -> Executable:  # fmt: skip
        """Compile `model` for `target` (see the module docstring for the options)."""
        import_tvm()
        spec = parse_target(target, threads=threads)
        dims = dict(dims or {})
        if tune:  # tuning wants static shapes: unbound symbols become 1
            dims = {**{s: 1 for s in _symbols(model)}, **dims}
        unsupported = self.unsupported(model)
        if unsupported and fallback:
            from graphopt.backends.partition import compile_partitioned

            return compile_partitioned(
                model, self, unsupported, fallback, target=target, tune=tune,
                tuning_dir=tuning_dir, dims=dims, remote=remote, threads=threads,
                progress=progress,
            )  # fmt: skip
        if unsupported:
            from graphopt.backends.tvm_lower import LoweringError

            names = ", ".join(n.describe() for n in unsupported[:5])
            more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
            raise LoweringError(
                f"the tvm backend cannot lower {names}{more}",
                hint="--fallback runs those nodes on ONNX Runtime (fallback='onnxruntime')",
            )
        from graphopt.backends.tvm_lower import lower_model

        info = CompileInfo()
        if progress is not None:
            progress("lower", 0, 1)
        start = time.perf_counter()
        mod = lower_model(model, dims)
        info.lower_s = time.perf_counter() - start
        if progress is not None:
            progress("build", 0, 1)
        executable = build_relax(
            mod, spec, tune=tune, tuning_dir=tuning_dir, progress=progress, info=info
        )
        import tvm

        meta = {
            "format": FORMAT, "target": spec.name, "target_config": spec.config,
            **_signature(model, dims), "dims": dims, "tvm_version": tvm.__version__,
            "tuning": {"trials": info.trials, "tasks": info.tasks, "tuned": info.tasks_tuned,
                       "seconds": round(info.tune_s, 1)},
        }  # fmt: skip
        return TvmExecutable(executable, spec, meta, remote=remote, threads=threads, info=info)


def _symbols(model: Model) -> set[str]:
    found: set[str] = set()
    for value in model.graph.inputs:
        if isinstance(value.type, TensorType) and value.type.shape is not None:
            found.update(d for d in value.type.shape if isinstance(d, str))
    return found


def compile_to_file(
    model: Model, target: str, output: str, *, tune: int = 0, fallback: str | None = None,
    dims: Mapping[str, int] | None = None, say: Callable[[str], None] = print,
) -> list[str]:  # fmt: skip
    """What `graphopt optimize --target tvm:...` does after the passes: compile, tune with the
    database next to the output (`<stem>.tuning/`), write the library and its JSON."""
    tuning_dir = os.path.splitext(output)[0] + ".tuning" if tune else None
    executable = TvmBackend().compile(
        model, target, tune=tune, tuning_dir=tuning_dir, dims=dims, fallback=fallback
    )
    written = executable.save(output)
    info: CompileInfo | None = getattr(executable, "info", None)
    if info is not None:
        say(
            f"tvm: lowered in {info.lower_s:.2f} s, built in {info.build_s:.1f} s"
            + (f", tuned {info.tasks_tuned}/{info.tasks} kernels ({info.trials} trials) in "
               f"{info.tune_s:.0f} s, database {info.tuning_dir}" if info.tasks else "")
            + (f"; {info.prepacked} kernels read weights packed at compile time"
               if info.prepacked else "")
        )  # fmt: skip
        for note in info.notes:
            say(f"note: {note}")
    spec = parse_target(target)
    if spec.is_gpu:
        import tvm

        if not tvm.runtime.enabled("cuda"):
            say(
                f"note: this TVM has no CUDA runtime, so {output} cannot run on this machine; it "
                "was written anyway and runs where TVM is built with CUDA"
            )
    elif spec.name == "aarch64":
        say(f"note: {output} is an aarch64 library: run it on an ARM board or under emulation")
    return written
