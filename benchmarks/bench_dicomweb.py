"""Retrieve rate and peak memory of ``neuron pull`` from Orthanc's DICOMweb plugin (WADO-RS, streamed part by part)
against the same study by C-GET from the same Orthanc: one study of N full-size RG1 chest CRs (pydicom-data, 1955 x
1841, uncompressed, 7.2 MB each) in 3 series, basic authentication on.

    .venv/bin/python -m benchmarks.bench_dicomweb [--n 12] [--rounds 2]

Each retrieval runs in a fresh child process (the Puller over an emptied output folder, nothing screened): timed from
the first QIDO-RS search / C-FIND to the last instance indexed; memory is the child's peak resident set (VmHWM)
above what it held just before the pull started (imports, database and receiver open), so the figure is what the
retrieval itself costs. Prints one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MALLOC = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # glibc tunables, passed to the child

CHILD = r"""
import json, sys, time
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
transport, source, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from db.store import Database
from neuron.dicomnet import Peer
from neuron.webclient import WebAccess, WebPeer
from producer.pull import PullConfig, Puller, PullQuery
from producer.receive import open_receiver
db = Database(f"sqlite:///{out / 'neuron.db'}"); db.create()
receiver = open_receiver(db, out)
peer = WebPeer.parse(source) if transport == "dicomweb" else Peer.parse(source)
config = PullConfig(peer, web=WebAccess(username="bench", password="bench-pw"), in_flight=1)
before = hwm()
started = time.perf_counter()
report = Puller(config, db, receiver, lambda s: None).run(PullQuery.parse("20240202", None, None))
took = time.perf_counter() - started
receiver.indexer.close()
print(json.dumps({"instances": report.retrieved_instances, "failed": report.failed, "seconds": took,
                  "peak_extra_bytes": hwm() - before, "rss_before_bytes": before}))
"""


def main() -> None:
    from pydicom.uid import generate_uid

    from neuron.sample_data import pydicom_data_dir
    from tests.orthanc import OrthancServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neuron-bench-dicomweb-"))
    server = OrthancServer(work / "orthanc", dicomweb=True, users={"bench": "bench-pw"}).start()
    try:
        import pydicom

        study, series = generate_uid(), [generate_uid() for _ in range(3)]
        total = 0
        for i in range(args.n):
            ds = pydicom.dcmread(pydicom_data_dir() / "RG1_UNCR.dcm")
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[i % 3]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyDate = "20240202"
            path = work / f"i{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
            server.upload(path)
            path.unlink()
        for round_ in range(args.rounds):
            for transport, source in (("dicomweb", server.dicomweb_url), ("dimse", server.peer)):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **MALLOC}
                res = subprocess.run([sys.executable, "-c", CHILD, transport, source, str(out)], capture_output=True,
                                     text=True, cwd=ROOT, env=env)
                if res.returncode != 0:
                    raise RuntimeError(res.stderr[-3000:])
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row.update(transport=transport, round=round_ + 1, study_bytes=total,
                           mb_per_s=total / 1e6 / row["seconds"], instance_mb=total / 1e6 / args.n,
                           load=open("/proc/loadavg").read().split()[:3], at=time.strftime("%H:%M:%S"))
                print(json.dumps(row), flush=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
