"""The networks' forward pass on each runtime, and its error against a float64 reference.

    .venv/bin/python -m benchmarks.bench_runtimes [--images 16] [--route chest-xray] [--threads N] [--seconds 6]

One process, one batch of ``--images`` images x 5 TTA views (the chest route: 1 x 224 x 224, inputs uniform in
[-1024, 1024], the model's own range; the EfficientNet routes: 3 x 224 x 224 ImageNet-normalised), what the device
job hands the network. For each runtime the network's three outputs (rectified final features, pooled features,
logits) are computed with the same threads; the rate is the fastest of at least three calls after a warm-up, and the
error is the largest absolute difference of the logits (and the largest relative difference of the feature maps)
from the same module run in float64 on the CPU. Untrained seeded weights (the chest model calibrated as
``--weights untrained`` does, the EfficientNet-B4 with timm's initialisation and a spread head): the claims are about
the runtimes, which compute the same operations whatever the weights. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from neuron.work import Route  # noqa: E402
from neuron_models import runtime  # noqa: E402

VIEWS = 5


def build(route: Route, cache: Path):
    if route is Route.CHEST_XRAY:
        from neuron_models.xray import build_untrained

        return build_untrained(seed=0, cache_dir=cache / "untrained"), 1
    from neuron_models.effnet import MRI_US_CONFIG, SKIN_CONFIG, build_untrained

    config = MRI_US_CONFIG if route is Route.MRI_US else SKIN_CONFIG
    model = build_untrained(config, config.class_names, 224, seed=0)
    return model, 3


def timed(fn, x: torch.Tensor, images: int, seconds: float) -> float:
    """Images per second of the fastest call, after a warm-up; at least 3 calls and ``seconds`` in all."""
    fn(x)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
        calls += 1
    return images / best


def errors(ref, got) -> dict:
    features, _, logits = ref
    return {"logits_max_abs": float((got[2].double() - logits).abs().max()),
            "features_max_rel": float((got[0].double() - features).abs().max() / features.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--route", default="chest-xray", choices=[r.value for r in Route])
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every runtime (default: torch's)")
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    route = Route(args.route)
    cache = Path(tempfile.mkdtemp(prefix="neuron-runtimes-"))
    model, channels = build(route, cache)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images * VIEWS, channels, 224, 224, generator=g)
    x = x * 2048 - 1024 if route is Route.CHEST_XRAY else (x - 0.45) / 0.226
    with torch.no_grad():
        ref = copy.deepcopy(model).double().torch_network(x.double())
    rows = []

    def row(name: str, fn) -> None:
        with torch.no_grad():
            rate = timed(fn, x, args.images, args.seconds)
            rows.append({"runtime": name, "images_per_s": round(rate, 2), **errors(ref, fn(x))})
        print(json.dumps(rows[-1]), file=sys.stderr)

    row("torch eager fp32", model.torch_network)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    row("torch eager fp32, channels-last", lambda t: cl.torch_network(t.contiguous(memory_format=torch.channels_last)))
    t0 = time.perf_counter()
    loaded = runtime.attach_onnxruntime(model, x[:2], torch.device("cpu"), "fp32", runtime.Threads(threads), cache)
    startup = {"export_s": round(loaded[0].export_s, 2), "session_s": round(loaded[0].session_s, 2),
               "check_s": round(loaded[0].check_s, 2), "total_s": round(time.perf_counter() - t0, 2)}
    row(f"onnxruntime {runtime.onnxruntime_version()} CPU execution provider fp32", model.compiled)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["x_torch"] = round(r["images_per_s"] / base, 2)
    print(json.dumps({"route": route.value, "images": args.images, "views": VIEWS, "threads": threads,
                      "torch": torch.__version__, "onnxruntime": runtime.onnxruntime_version(),
                      "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
                      "onnxruntime_startup": startup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
