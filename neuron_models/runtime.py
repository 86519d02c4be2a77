"""What runs a model's network: torch eager, or ONNX Runtime on a graph exported from the same loaded module.

    ScreeningModel.torch_network (input -> rectified final features, pooled features, logits)
        ─► torch.onnx.export (TorchScript exporter, opset 17, dynamic batch axis): only the network; preprocessing,
           TTA views, CAM maps, the OOD distance and the overlays stay in torch, one implementation each
        ─► CACHE/onnx/<model>-<key>.onnx and its .sha256; the key hashes the weights (sha256 of every tensor), the
           export settings and the torch, onnx and onnxruntime versions, so a second start opens the file
        ─► checked once, when written, against the torch module on a fixed probe batch: refused (RuntimeRefused,
           with the numbers) if it differs beyond the parity bound
        ─► opened: the bytes checked against their sha256 (a mismatch exports again), an InferenceSession on the
           CPU execution provider (on CUDA the TensorRT provider where installed, else the CUDA provider)
        ─► model.compiled = OnnxNetwork: the same three outputs as torch tensors

ONNX Runtime's CPU provider runs these convolutional networks about three times as fast as torch eager on the same
threads, at torch's own fp32 error (BENCHMARKS.md "The model's runtime"); ``auto`` therefore picks it on a CPU and
keeps torch on CUDA, where no GPU measurement has yet said otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from neuron.errors import ConfigError, RuntimeRefused
from neuron.settings import disable_vendor_telemetry
from neuron_models.registry import Network, ScreeningModel, read_with_digest, write_with_digest

log = logging.getLogger(__name__)
disable_vendor_telemetry()  # before anything imports onnxruntime

OPSET = 17
OUTPUTS = ("features", "pooled", "logits")
# How far the exported graph may differ from the torch module on the probe batch before it is refused: in fp32 the
# exactness contract of the results (README "Precision": probabilities within 1e-5 of torch's), features relative to
# their largest magnitude; in fp16 (CUDA) the fast precisions' documented tolerance.
PARITY = {"fp32": {"probability": 1e-5, "relative": 1e-4}, "fp16": {"probability": 1e-2, "relative": 5e-2}}


@contextlib.contextmanager
def float32_mode(exact: bool):
    """TF32 rounds fp32 convolutions and matrix products to a 10-bit mantissa on Ampere and newer GPUs (cuDNN allows it
    for convolutions by default: torch.backends.cudnn.allow_tf32, PyTorch's "TensorFloat-32 (TF32) on Ampere (and
    later) devices" note): exact mode switches it off around the device job, so a GPU computes what the CPU
    computes, whatever another job in the process asked for."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not exact
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Runtime(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


def resolve(name: str | Runtime, device: torch.device) -> Runtime:
    """``auto``: ONNX Runtime on a CPU, torch on CUDA (measured on the CPU only so far)."""
    runtime = Runtime(name)
    if runtime is Runtime.AUTO:
        return Runtime.ONNXRUNTIME if device.type == "cpu" else Runtime.TORCH
    return runtime


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _onnx_version() -> str | None:
    try:
        import onnx
    except ImportError:
        return None
    return onnx.__version__


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer of the module, by name, dtype and shape: what the graph was exported
    from, whether the weights came from a file, a checkpoint or the seeded untrained build."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph is: the model, its input geometry and precision, and what produced it."""

    model: str
    weights: str  # weights_digest of the module
    channels: int
    size: int
    precision: str = "fp32"  # "fp16": exported from a half-precision copy (CUDA)
    opset: int = OPSET
    versions: dict = field(default_factory=lambda: {"torch": torch.__version__, "onnx": _onnx_version(),
                                                    "onnxruntime": onnxruntime_version()})

    @property
    def key(self) -> str:
        blob = json.dumps({"model": self.model, "weights": self.weights, "channels": self.channels,
                           "size": self.size, "precision": self.precision, "opset": self.opset,
                           "outputs": OUTPUTS, "versions": self.versions}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"{self.model}-{self.precision}-{self.key}.onnx"


class _Graph(nn.Module):
    """The exported module: the model's own ``torch_network``, nothing rewritten."""

    def __init__(self, model: ScreeningModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Network:
        return self.model.torch_network(x)


def export_bytes(model: ScreeningModel, spec: GraphSpec) -> bytes:
    """The network of ``model`` as ONNX (on the CPU, in fp32 or for fp16 from a half copy), batch axis dynamic."""
    module = _Graph(model).eval()
    dtype = torch.float16 if spec.precision == "fp16" else torch.float32
    if spec.precision == "fp16":
        module = copy.deepcopy(module).half()
    dummy = torch.zeros(2, spec.channels, spec.size, spec.size, dtype=dtype, device=next(model.parameters()).device)
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in ("input", *OUTPUTS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (dummy,), buf, opset_version=spec.opset, dynamo=False, input_names=["input"],
                          output_names=list(OUTPUTS), dynamic_axes=axes, do_constant_folding=True)
    return buf.getvalue()


def read_verified(path: Path) -> bytes | None:
    """The graph's bytes if they match the digest written beside them; None (export again) otherwise."""
    data, mismatched = read_with_digest(path)
    if mismatched:
        log.warning("%s does not match its sha256; exporting the graph again", path)
    return data


@dataclass(frozen=True)
class Threads:
    """ONNX Runtime's thread pools. Intra-op threads run one operator; they do not spin while waiting for work, so
    a reader process or the PNG writer gets a core the moment the model does not need it."""

    intra_op: int
    spin: bool = False


def providers_for(device: torch.device, precision: str, cache_dir: Path) -> list:
    """The execution providers for a device: the CPU provider on a CPU; on CUDA the TensorRT provider (its engines
    cached beside the ONNX files, fp16 where asked for) where onnxruntime-gpu has it, then the CUDA provider."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": index, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(Path(cache_dir) / "tensorrt"), "trt_timing_cache_enable": True}))
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(f"--runtime onnxruntime on {device} needs ONNX Runtime's CUDA execution provider, which "
                          f"this onnxruntime build lacks (it has {', '.join(available)}); install the CUDA extra "
                          f"(pip install 'neuron-screening[gpu]', which brings onnxruntime-gpu) or use --runtime torch")
    chosen.append(("CUDAExecutionProvider", {"device_id": index, "cudnn_conv_algo_search": "DEFAULT",
                                             # fp32 is exact: no TF32 (as the torch path switches it off)
                                             "use_tf32": 0}))
    return chosen


def open_session(data: bytes, device: torch.device, precision: str, threads: Threads, cache_dir: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notes on node placement are not ours to print
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if threads.spin else "0")
    return onnxruntime.InferenceSession(data, options, providers=providers_for(device, precision, cache_dir))


class OnnxNetwork:
    """Runs a session as the model's network: a (N, C, S, S) float tensor in, the three outputs as tensors on the
    same device. On the CPU the arrays ONNX Runtime returns become tensors without a copy; on CUDA the input and
    outputs are bound to torch's memory (I/O binding), so nothing crosses the bus."""

    def __init__(self, session, device: torch.device, precision: str):
        self.session = session
        self.device = device
        self.half = precision == "fp16"
        self.provider = session.get_providers()[0]
        self._shapes: dict[int, list[tuple[int, ...]]] = {}

    def __call__(self, x: torch.Tensor) -> Network:
        if self.half:
            x = x.half()
        x = x.contiguous()
        if self.device.type == "cpu":
            outs = self.session.run(None, {"input": x.numpy()})
            return tuple(torch.from_numpy(o).float() for o in outs)  # type: ignore[return-value]
        return self._run_cuda(x)

    def _run_cuda(self, x: torch.Tensor) -> Network:
        import numpy as np

        n = x.shape[0]
        if n not in self._shapes:  # output shapes by batch size, learnt from one run
            outs = self.session.run(None, {"input": x.cpu().numpy()})
            self._shapes[n] = [tuple(o.shape) for o in outs]
        dtype = torch.float16 if self.half else torch.float32
        np_type = np.float16 if self.half else np.float32
        results = [torch.empty(shape, dtype=dtype, device=x.device) for shape in self._shapes[n]]
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input("input", "cuda", index, np_type, tuple(x.shape), x.data_ptr())
        for name, out in zip(OUTPUTS, results, strict=True):
            binding.bind_output(name, "cuda", index, np_type, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # the input is written on torch's stream
        self.session.run_with_iobinding(binding)
        return tuple(r.float() for r in results)  # type: ignore[return-value]


@dataclass(frozen=True)
class Loaded:
    """What attaching a runtime cost, for the start-up figure."""

    path: Path
    exported: bool
    export_s: float  # exporting the graph, or reading and verifying the cached one
    session_s: float  # creating the InferenceSession
    check_s: float  # the parity check of a new graph (0 for a cached one)
    provider: str


def _parity(model: ScreeningModel, run: Callable[[torch.Tensor], Network], probe: torch.Tensor,
            precision: str) -> str | None:
    """None when the graph's outputs on the probe batch are within the parity bound of the torch module's; else
    what differs, by how much."""
    bound = PARITY[precision]
    with torch.no_grad(), float32_mode(exact=True):  # the reference is torch's exact fp32, on any device
        ref = model.torch_network(probe)
        got = run(probe)
    problems = []
    for name, a, b in zip(OUTPUTS, ref, got, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        if a.shape != b.shape:
            return f"{name} has shape {tuple(b.shape)}, torch's {tuple(a.shape)}"
        scale = float(a.abs().max().clamp(min=1e-12))
        rel = float((a - b).abs().max()) / scale
        if rel > bound["relative"]:
            problems.append(f"{name} differs by {rel:.2e} of its largest value (bound {bound['relative']:.0e})")
    dp = float((model.probabilities(ref[2].float()) - model.probabilities(got[2].float().to(ref[2].device)))
               .abs().max())
    if dp > bound["probability"]:
        problems.append(f"probabilities differ by {dp:.2e} (bound {bound['probability']:.0e})")
    return "; ".join(problems) or None


def attach_onnxruntime(model: ScreeningModel, probe: torch.Tensor, device: torch.device, precision: str,
                       threads: Threads, cache_dir: Path) -> list[Loaded]:
    """Run every network of ``model`` (an ensemble's members each) on ONNX Runtime: export or open the cached
    graph, check it, set ``compiled``. ``probe``: a fixed (n, C, S, S) batch of the model's normalised input.
    Raises RuntimeRefused when a new graph differs from torch beyond the parity bound, ConfigError when
    onnxruntime (or its export dependency onnx) is missing."""
    if onnxruntime_version() is None:
        raise ConfigError("--runtime onnxruntime needs the onnxruntime package (a dependency of neuron-screening: "
                          "pip install onnxruntime), or use --runtime torch")
    graph_precision = "fp16" if precision == "fp16" and device.type == "cuda" else "fp32"
    loaded = []
    for leaf in model.leaves():
        leaf.compiled = None
        spec = GraphSpec(leaf.config.name, weights_digest(leaf), probe.shape[1], probe.shape[2], graph_precision)
        path = spec.path(Path(cache_dir) / "onnx")
        t0 = time.perf_counter()
        data = read_verified(path)
        exported = data is None
        if data is None:
            if _onnx_version() is None:
                raise ConfigError("exporting the network for ONNX Runtime needs the onnx package (pip install "
                                  "onnx), or use --runtime torch")
            data = export_bytes(leaf, spec)
        export_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        session = open_session(data, device, graph_precision, threads, Path(cache_dir))
        network = OnnxNetwork(session, device, graph_precision)
        session_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        if exported:
            problem = _parity(leaf, network, probe.to(device), graph_precision)
            if problem is not None:
                raise RuntimeRefused(
                    f"{leaf.config.name}: the ONNX Runtime graph ({network.provider}, onnxruntime "
                    f"{onnxruntime_version()}) does not compute what torch computes on the probe batch: {problem}; "
                    f"run with --runtime torch (NEURON_RUNTIME=torch) and report the versions")
            try:
                write_with_digest(path, data)
            except OSError as exc:  # a read-only cache costs an export at every start, not the run
                log.warning("could not cache the ONNX graph in %s: %s", path.parent, exc)
        leaf.compiled = network
        loaded.append(Loaded(path, exported, export_s, session_s, time.perf_counter() - t2, network.provider))
        log.info("%s on ONNX Runtime %s (%s, %d threads): %s in %.2f s, session in %.2f s, checked in %.2f s",
                 leaf.config.name, onnxruntime_version(), network.provider, threads.intra_op,
                 "exported" if exported else "cached graph verified", export_s, session_s, loaded[-1].check_s)
    return loaded


def identity(runtime: Runtime, device: torch.device, precision: str, providers: list[str] | None = None) -> dict:
    """What ran the network, for the results' provenance and settings hash."""
    if runtime is Runtime.ONNXRUNTIME:
        return {"name": "onnxruntime", "version": onnxruntime_version(), "opset": OPSET,
                "provider": (providers or ["CPUExecutionProvider"])[0],
                "graph": "fp16" if precision == "fp16" and device.type == "cuda" else "fp32"}
    return {"name": "torch", "version": torch.__version__}


__all__ = ["GraphSpec", "Loaded", "OnnxNetwork", "PARITY", "Runtime", "RuntimeRefused", "Threads", "float32_mode",
           "attach_onnxruntime", "export_bytes", "identity", "onnxruntime_version", "read_verified", "resolve",
           "weights_digest"]
