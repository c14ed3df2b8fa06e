"""The runtimes an exported graph is checked and timed in: onnxruntime (CPU) and OpenVINO (CPU).

Each ``open_runtime`` returns a ``Runtime``: a callable on a float32 numpy batch, its name and
version, and ``integer_ops()`` -- which operators of the optimized graph the runtime executes with
integer kernels (onnxruntime: QLinear*/ *Integer* nodes of its optimized graph; OpenVINO: nodes of
the compiled model whose runtime precision is u8/i8), so a report says what actually fused.
A runtime that cannot load a graph gives a one-line ZsqError naming what it needs.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from zsq.errors import ZsqError

RUNTIMES = ("ort", "openvino")
# the oldest releases that implement an ONNX opset (their release notes); opset 21 brings INT4/UINT4
ORT_FOR_OPSET = {17: "1.13", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18"}


@dataclass
class Runtime:
    name: str
    version: str
    run: Callable[[np.ndarray], np.ndarray]
    integer_ops: Callable[[], Dict[str, int]]
    float_ops: Callable[[], Dict[str, int]] = field(default=lambda: {})
    float_layers: Callable[[], List[str]] = field(default=lambda: [])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))


def parse_runtimes(text: str) -> Tuple[str, ...]:
    """'ort' | 'openvino' | 'all' | 'ort,openvino' -> names."""
    names = RUNTIMES if text == "all" else tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise ZsqError(f"unknown runtime {', '.join(bad) or text!r}; choose ort, openvino, all or a comma list")
    return names


def _graph_opset(onnx_path) -> int:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _load_error(runtime: str, version: str, onnx_path, e: Exception) -> ZsqError:
    opset = _graph_opset(onnx_path)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    need = ""
    if runtime == "onnxruntime" and opset in ORT_FOR_OPSET:
        need = f"; ONNX opset {opset} needs onnxruntime >= {ORT_FOR_OPSET[opset]}"
    if opset >= 21:
        need += " (or export with --opset 17: int8 containers, no INT4)"
    return ZsqError(f"{runtime} {version} cannot load the opset-{opset} graph {Path(onnx_path).name}: {first}{need}")


# CPU features with an int8 dot product that sums u8 x s8 products in int32 (no int16 saturation)
INT8_DOT_FEATURES = ("AVX512VNNI", "AVX_VNNI", "AVXVNNI", "AMX_INT8")


def cpu_has_int8_dot() -> bool:
    """Whether this CPU runs int8-weight graphs exactly: x86 with VNNI or AMX (from CPUID, as numpy reads
    it), or not x86 at all. onnxruntime's u8 x s8 kernels on other x86 CPUs (AVX2, AVX-512 without
    VNNI) add pairs of products in saturating int16, and OpenVINO's lose weight precision there."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return any(features.get(f, False) for f in INT8_DOT_FEATURES)


def int8_weight_names(onnx_path) -> List[str]:
    """Weight initializers of the graph stored as int8 with codes beyond the range that cannot saturate."""
    import onnx
    from onnx import numpy_helper

    from zsq.export.onnx import SATURATION_SAFE_CODE

    m = onnx.load(str(onnx_path))
    inits = {i.name: i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    wide = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            if np.abs(numpy_helper.to_array(inits[n.input[0]]).astype(np.int16)).max() > SATURATION_SAFE_CODE:
                wide.append(n.input[0])
    return wide


FLOAT_COMPUTE = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "Add")


def _ort_optimized_nodes(onnx_path) -> List[Tuple[str, str]]:
    """(op type, node name) of onnxruntime's optimized graph at the portable level (QDQ fusion, no
    NCHWc layout)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="zsq-ort-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        return [(n.op_type, n.name) for n in onnx.load(so.optimized_model_filepath).graph.node]


def _ort_optimized_ops(onnx_path) -> Counter:
    return Counter(t for t, _ in _ort_optimized_nodes(onnx_path))


def _layer_name(node_name: str) -> str:
    """'/layer1/layer1.0/conv2/Conv' -> 'layer1/layer1.0/conv2' (the exporter's module scope)."""
    parts = [p for p in node_name.split("/") if p]
    return "/".join(parts[:-1]) or node_name


def ort_runtime(onnx_path, threads: int = 1, spin: bool = True) -> Runtime:
    """spin=False: the intra-op threads sleep when idle instead of spinning (onnxruntime's default), so
    several sessions timed in turn do not steal the cores from each other."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _load_error("onnxruntime", ort.__version__, onnx_path, e) from None
    name = sess.get_inputs()[0].name

    def integer():
        return {k: v for k, v in _ort_optimized_ops(onnx_path).items()
                if k.startswith("QLinear") or "Integer" in k or k == "QGemm"}

    def fl():
        return {k: v for k, v in _ort_optimized_ops(onnx_path).items() if k in FLOAT_COMPUTE}

    def fl_layers():
        return [f"{_layer_name(n)} ({t})" for t, n in _ort_optimized_nodes(onnx_path) if t in FLOAT_COMPUTE]

    return Runtime("ort", ort.__version__, lambda x: sess.run(None, {name: x})[0], integer, fl, fl_layers)


def openvino_runtime(onnx_path, threads: int = 1) -> Runtime:
    try:
        import openvino as ov
    except ImportError:
        raise ZsqError("OpenVINO is not installed: pip install 'zsq[openvino]' (or pip install openvino)") from None
    core = ov.Core()
    try:
        model = core.read_model(str(onnx_path))
        # f32 for what is not quantized: OpenVINO would otherwise pick bf16 on CPUs that have it
        cm = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32",
                                               "PERFORMANCE_HINT": "LATENCY"})
    except Exception as e:
        raise _load_error("openvino", ov.__version__, onnx_path, e) from None
    req = cm.create_infer_request()

    def run(x):
        return req.infer({0: x})[0].copy()

    def compute_ops(ints: bool) -> List[Tuple[str, str]]:
        out = []
        for op in cm.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind, prec = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            if kind in ("Convolution", "FullyConnected", "MatMul", "Eltwise") and (prec in ("u8", "i8")) == ints:
                out.append((f"{kind}({prec})", op.get_friendly_name()))
        return out

    def by_precision(ints: bool) -> Dict[str, int]:
        return dict(Counter(k for k, _ in compute_ops(ints)))

    def fl_layers():
        return [f"{_layer_name(n)} ({k})" for k, n in compute_ops(False) if not k.startswith("Eltwise")]

    return Runtime("openvino", ov.__version__, run, lambda: by_precision(True), lambda: by_precision(False),
                   fl_layers)


def open_runtime(name: str, onnx_path, threads: int = 1, spin: bool = True) -> Runtime:
    """spin applies to onnxruntime only (OpenVINO's CPU threads do not busy-wait between calls)."""
    if name == "ort":
        return ort_runtime(onnx_path, threads, spin)
    if name == "openvino":
        return openvino_runtime(onnx_path, threads)
    raise ZsqError(f"unknown runtime {name!r}; choose one of {RUNTIMES}")


def run_batches(rt: Runtime, images, batch_size: int = 64) -> np.ndarray:
    x = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    return np.concatenate([rt(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def latency_ms(rt: Runtime, x: np.ndarray, runs: int = 30, warmup: int = 3) -> float:
    """Median wall time of one call on ``x`` (after warm-up runs)."""
    import time

    for _ in range(warmup):
        rt(x)
    times: List[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        rt(x)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def interleaved_latency(paths: Dict[str, "Path"], runtime: str, threads: int, x: np.ndarray, rounds: int,
                        spin: bool = True) -> Dict[str, float]:
    """Median ms per graph; each round times every graph once, in turn, so load changes on a shared machine
    hit all of them alike (the ratios are the comparison). With several threads, onnxruntime's idle threads
    spin after each call and take cores from the next graph timed: spin=False."""
    import time

    rts = {k: open_runtime(runtime, p, threads, spin=spin) for k, p in paths.items()}
    for rt in rts.values():
        for _ in range(2):
            rt(x)
    times: Dict[str, List[float]] = {k: [] for k in rts}
    for _ in range(rounds):
        for k, rt in rts.items():
            t = time.perf_counter()
            rt(x)
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


# The CPU features that decide how int8 graphs run (and how fast): recorded with every latency
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info() -> Dict[str, object]:
    """This CPU's model name, the CPU_FLAGS it has (from /proc/cpuinfo on Linux) and whether it runs
    int8-weight graphs exactly (cpu_has_int8_dot)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "int8_dot": cpu_has_int8_dot()}
