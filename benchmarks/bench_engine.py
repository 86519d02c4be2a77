"""Throughput of each engine stage and of the whole embedded run, on whatever device is available.

    python benchmarks/bench_engine.py [--device auto|cpu|cuda] [--batch 16] [--images 32]

Uses RG1 (a real 1955x1841 CR chest radiograph from pydicom-data) and untrained weights, which cost the same as the
real ones. Prints one JSON object; BENCHMARKS.md records the numbers with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from neuron.routes import Route
from neuron.sample_data import pydicom_data_dir
from neuron.settings import Settings
from neuron_models.preprocess import normalize, prepare_batch
from worker.decode import decode_instance
from worker.embedded import run_folder
from worker.engine import Engine


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()

    src = pydicom_data_dir() / "RG1_UNCR.dcm"
    settings = Settings(weights="untrained", device=args.device, batch_size=args.batch)
    engine = Engine.from_settings(settings)
    lr = engine.routes[Route.CHEST_XRAY]
    frames = decode_instance(src, "bench", 1, 1 << 30) * args.batch
    out: dict = {"device": str(engine.device), "device_name": torch.cuda.get_device_name() if
                 engine.device.type == "cuda" else platform.processor() or platform.machine(),
                 "torch_threads": torch.get_num_threads(), "batch": args.batch}

    t = timed(lambda: decode_instance(src, "bench", 1, 1 << 30))
    out["decode_2k_cr_img_s_one_thread"] = round(1 / t, 1)
    t = timed(lambda: prepare_batch(frames, lr.preprocess, engine.device))
    out["preprocess_img_s"] = round(args.batch / t, 1)
    x, _, _ = prepare_batch(frames, lr.preprocess, engine.device)
    with torch.no_grad():
        t = timed(lambda: lr.model(normalize(x, lr.preprocess)))
        out["model_1_view_img_s"] = round(args.batch / t, 1)
    t = timed(lambda: engine.infer(Route.CHEST_XRAY, frames), repeat=2)
    out["infer_5_views_plus_cam_img_s"] = round(args.batch / t, 1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(src)
        for i in range(args.images):
            ds.SOPInstanceUID = generate_uid()
            ds.save_as(folder / f"{i}.dcm")
        run_settings = settings.with_(out_dir=Path(tmp) / "out")
        start = time.perf_counter()
        report = run_folder(folder, run_settings, engine=Engine(run_settings, engine.routes, engine.device))
        elapsed = time.perf_counter() - start
        out["embedded_run_img_s"] = round(report.screened / elapsed, 2)
        out["embedded_run_images"] = report.screened
        shutil.rmtree(folder)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
