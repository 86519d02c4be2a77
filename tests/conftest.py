"""Shared fixtures: real DICOMs from pydicom and pydicom-data, copies derived from them, the untrained models.

Derived files keep the real pixels of the source (RG1, a CR chest radiograph) and change only what a test needs:
size, photometric interpretation, transfer syntax, UIDs. See tests/data/README.md for provenance.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from neuron.sample_data import pydicom_data_dir, pydicom_test_dir
from neuron.settings import Settings

MODEL = "xrv-densenet121-res224-all"
SCRATCH_CANDIDATES = ("/dev/shm",)


def run_together(*calls: dict) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(**call)`` for each call, all at once; the results in the calls' order. For processes that do
    not depend on each other: most of a `neuron` process's start is a single-threaded import of torch and timm, so on
    two cores two of them start in the time of one."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: subprocess.run(**call), calls))


def run_in_background(**call) -> Future:
    """``subprocess.run(**call)`` on a thread of its own; ``.result()`` is its CompletedProcess. For work this process
    does meanwhile that the command does not read (a reference run with the session's models, say)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(subprocess.run, **call)
    finally:
        pool.shutdown(wait=False)


def _free_gb(path: str) -> float:
    return shutil.disk_usage(path).free / 1e9


def pytest_configure(config):
    """Put the tests' scratch (tmp_path, the servers' data folders, worker processes' TMPDIR) on the roomiest of the
    system temp folder and /dev/shm, unless TMPDIR is set. A CI disk may hold little more than the virtual
    environment; the suite needs about 1 GB at its peak (EfficientNet-B4 checkpoints are 69 MB each, a training
    state 207 MB), and the machines these tests run on have a large RAM-backed /dev/shm."""
    if os.environ.get("TMPDIR"):
        return
    options = [tempfile.gettempdir()] + [p for p in SCRATCH_CANDIDATES if os.path.isdir(p) and os.access(p, os.W_OK)]
    best = max(options, key=_free_gb)
    os.environ["TMPDIR"] = best
    tempfile.tempdir = None


# The test modules that take longest in a whole run (--durations, 2 cores), longest first. `make test` runs two pytest
# processes that each take one module at a time (pytest-xdist, --dist loadfile); started on the long modules, they end
# close together instead of one waiting for the other's last long module.
LONGEST_FIRST = ("test_distributed", "test_multihost", "test_training", "test_faults", "test_network", "test_bench",
                 "test_runtime", "test_load", "test_scenarios", "test_audit", "test_hostile", "test_readers",
                 "test_dicomweb", "test_status_live", "test_operations", "test_ood", "test_pipeline", "test_model")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each module's own order stays


def pytest_report_header(config):
    scratch = tempfile.gettempdir()
    return f"scratch: {scratch} ({_free_gb(scratch):.1f} GB free)"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return pydicom_data_dir()


@pytest.fixture(scope="session")
def test_files_dir() -> Path:
    return pydicom_test_dir()


@pytest.fixture(scope="session")
def rg1(data_dir) -> Path:
    """CR chest radiograph, MONOCHROME1, 15 bits, 1955x1841, uncompressed."""
    return data_dir / "RG1_UNCR.dcm"


def small_chest(src: Path, dest: Path, step: int = 4, **changes) -> Path:
    """A smaller real chest CR: RG1's pixels decimated by ``step``, new UIDs, any attribute changes applied."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array[::step, ::step].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def monochrome2_twin(src: Path, dest: Path) -> Path:
    """The same image stored the other way round: MONOCHROME2 with inverted stored values and the mirrored window.
    DICOM's linear window centres on c - 0.5, so the exact mirror of centre c under v -> M - v is M - c + 1."""
    ds = pydicom.dcmread(src)
    maxval = (1 << int(ds.BitsStored)) - 1
    arr = ds.pixel_array.astype(np.int64)
    ds.PixelData = (maxval - arr).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter = maxval - float(ds.WindowCenter) + 1
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest, enforce_file_format=True)
    return dest


def clone_with(src: Path, dest: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    ds = copy.deepcopy(ds)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dest, enforce_file_format=False)
    return dest


@pytest.fixture(scope="session")
def chest_small(tmp_path_factory, rg1) -> Path:
    return small_chest(rg1, tmp_path_factory.mktemp("chest") / "chest_small.dcm")


@pytest.fixture(scope="session")
def untrained_settings(tmp_path_factory) -> Settings:
    return Settings(out_dir=tmp_path_factory.mktemp("out"), weights="untrained", device="cpu", batch_size=8,
                    readers=2)


@pytest.fixture(scope="module")
def cache(models, untrained_settings) -> Path:
    """The untrained model's calibration, built once by the session's models and shared by every process a test
    starts (NEURON_CACHE_DIR)."""
    return untrained_settings.resolved_cache_dir


@pytest.fixture(scope="session")
def models(untrained_settings):
    """Every route's untrained model on the CPU, loaded once for the session; pipelines with other run settings are
    built over them (``Pipeline(models, settings)``)."""
    from worker.models import Models

    return Models.from_settings(untrained_settings)


@pytest.fixture(scope="session")
def job(models):
    """The device job over the session's models: ``job.infer(route, frames)`` runs one batch synchronously."""
    from worker.device import DeviceJob

    return DeviceJob(models)


@pytest.fixture(scope="session")
def job_plain(untrained_settings):
    """CLAHE and TTA off: the path torchxrayvision's reference code takes."""
    from worker.device import DeviceJob
    from worker.models import Models

    return DeviceJob(Models.from_settings(untrained_settings.with_(clahe=False, tta=False)))


@pytest.fixture(scope="session")
def servers():
    """One real Redis and one real PostgreSQL for the session (tests/services.py): (broker URL, PgServer). Shared by
    the distributed tests and the scenario table, so a session starts them once."""
    from .services import postgres_server, redis_server

    with redis_server() as broker, postgres_server() as pg:
        yield broker.url, pg


def empty_database_url(request, tmp_path: Path, dialect: str) -> str:
    """An empty database of ``dialect``: a new SQLite file in ``tmp_path``, or the session's PostgreSQL (``servers``)
    with everything dropped. For fixtures parametrized over both databases."""
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'neuron.db'}"
    from .services import reset_postgres

    _, pg = request.getfixturevalue("servers")
    reset_postgres(pg.url)
    return pg.url


def seed_untrained_cache(untrained_settings, *outs: Path) -> None:
    """The untrained model's calibration and its ONNX graph, computed once per test session (the ``models``
    fixture), are linked into each output folder so no process spends ~30 s of CPU recomputing the one (two workers
    starting together: 40 s) or seconds exporting the other; both caches are checked by their sha256, and a process
    replaces a cache file by renaming, never by writing into it."""

    def link(src: str, dst: str) -> None:
        if not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)

    for out in outs:
        for name in ("untrained", "onnx"):
            cache = untrained_settings.resolved_cache_dir / name
            if cache.is_dir():
                shutil.copytree(cache, out / ".cache" / name, dirs_exist_ok=True, copy_function=link)


@pytest.fixture
def env(servers, tmp_path, untrained_settings, models) -> dict[str, str]:
    """The environment of the distributed mode's processes: empty database and broker, the test's own output folder
    (holding the session's calibrated untrained model)."""
    import redis

    from .services import reset_postgres

    broker, pg = servers
    reset_postgres(pg.url)
    redis.Redis.from_url(broker).flushall()
    seed_untrained_cache(untrained_settings, tmp_path / "out")
    return {**os.environ, "NEURON_BROKER_URL": broker, "NEURON_DATABASE_URL": pg.url,
            "NEURON_OUT": str(tmp_path / "out"), "NEURON_VISIBILITY_TIMEOUT": "8", "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1"}
