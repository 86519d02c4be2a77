"""DICOM on the network against real peers: `neuron listen` / `neuron pull` / `neuron send` processes,
Debian's Orthanc as the PACS (tests/orthanc.py), DCMTK's storescu as the modality, real forward passes (untrained
weights) on real pixels (RG1, a CR chest radiograph from pydicom-data, decimated; tests/conftest.py).

One listener process and one Orthanc serve the module (started side by side); the faults that need their own (a
killed listener, a full disk, TLS) start their own. Timers are short: quiet times of 0.3 s, retries of 0.3 s, polls
of 0.1 s. Processes whose graceful stop no test here claims are killed (SIGKILL) when they are done with; the killed
listener's successor is stopped gracefully and checked.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from functools import partial
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from neuron.errors import ConfigError
from neuron.servers import free_port

from . import test_distributed
from .conftest import run_in_background, small_chest
from .orthanc import ORTHANC, OrthancServer
from .test_distributed import N_LABELS, stop

pytestmark = pytest.mark.timeout(300)

PATIENT_NAME, PATIENT_ID = "MARKER^PATIENT^NETWORK", "MRKID4242"
SC_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"  # PS3.4 B.5
# storescu proposes one family of transfer syntaxes per run (DCMTK storescu --help): each file goes with its own
PROPOSE = {ExplicitVRLittleEndian: [], ImplicitVRLittleEndian: ["-xi"], DeflatedExplicitVRLittleEndian: ["-xd"],
           RLELossless: ["-xr"], JPEG2000Lossless: ["-xv"], JPEGLSLossless: ["-xt"], JPEGLosslessSV1: ["-xs"]}


wait_until = partial(test_distributed.wait_until, poll=0.1)  # listeners answer in milliseconds: poll closer


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process group started with ``start_new_session``, where no graceful stop is being tested."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _need(binary: str) -> None:
    if shutil.which(binary) is None and not Path(binary).exists():
        pytest.fail(f"{binary} is missing: `bash .ci/run` installs Debian's orthanc and dcmtk")


def chest(rg1: Path, dest: Path, step: int, study: str, series: str, date: str, ts=ExplicitVRLittleEndian) -> Path:
    """A real CR chest radiograph (RG1's pixels, decimated) with patient markers, in transfer syntax ``ts``."""
    path = small_chest(rg1, dest, step=step, StudyInstanceUID=study, SeriesInstanceUID=series, StudyDate=date,
                       PatientName=PATIENT_NAME, PatientID=PATIENT_ID, AccessionNumber=f"ACC{date}")
    if ts in (RLELossless, JPEG2000Lossless, JPEGLSLossless):  # pydicom's encoders
        ds = pydicom.dcmread(path)
        ds.compress(ts, generate_instance_uid=False)
        ds.save_as(path)
    elif ts != ExplicitVRLittleEndian:  # DCMTK's converters
        tmp = path.with_suffix(".src")
        path.rename(tmp)
        command = ["dcmcjpeg", "+e1"] if ts == JPEGLosslessSV1 else \
            ["dcmconv", "+ti" if ts == ImplicitVRLittleEndian else "+td"]
        subprocess.run([*command, str(tmp), str(path)], check=True, capture_output=True)
        tmp.unlink()
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    return path


def storescu(port: int, files, *flags: str, aet: str = "STORESCU") -> tuple[int, str]:
    """DCMTK's storescu, one association; (exit code, what it said)."""
    res = subprocess.run(["storescu", "-v", "-nh", "-R", *flags, "-aet", aet, "-aec", "NEURON", "127.0.0.1",
                          str(port), *map(str, files)], capture_output=True, text=True, timeout=60)
    return res.returncode, res.stdout + res.stderr


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def query(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


def quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    return {**env, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **extra}


def neuron(env, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


class ListenerProcess:
    """A `neuron listen` process on a free port, screening with untrained weights on the CPU. ``quiet``: its series
    and study quiet times (a study is released ``2 x quiet`` after its last instance)."""

    def __init__(self, out: Path, cache: Path, *extra: str, env: dict[str, str] | None = None, quiet: float = 0.3):
        self.out, self.port, self.quiet = out, free_port(), quiet
        self.db, self.log = out / "neuron.db", out.parent / f"{out.name}-listen.log"
        self.extra = extra
        self.env = {**(env or quiet_env()), "NEURON_CACHE_DIR": str(cache)}
        self.proc: subprocess.Popen | None = None

    def launch(self) -> ListenerProcess:
        log = open(self.log, "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neuron", "listen", "--port", str(self.port), "--out", str(self.out),
             "--weights", "untrained", "--device", "cpu", "--batch-size", "8", "--series-quiet", str(self.quiet),
             "--study-quiet", str(self.quiet), "--max-wait", str(max(30.0, 4 * self.quiet)), "--min-free-gb", "0",
             "-v", *self.extra], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> ListenerProcess:
        wait_until(lambda: f":{self.port} (" in self.log.read_text(), 120, "the listener to listen", [self.proc])
        return self

    def start(self) -> ListenerProcess:
        return self.launch().ready()

    def count(self, where: str) -> int:
        try:
            return query(self.db, f"select count(*) from instances where {where}")[0][0]
        except sqlite3.OperationalError:
            return 0


@pytest.fixture(scope="module")
def peers(tmp_path_factory, cache):
    """The module's listener and the PACS, started side by side (Orthanc is up while the listener imports). The PACS
    knows the listener as NEURON (for C-MOVE) and accepts Neuron's C-FIND/C-GET/C-STORE."""
    _need("storescu")
    _need(ORTHANC)
    listener = ListenerProcess(tmp_path_factory.mktemp("listener") / "out", cache, "--allow-ae", "STORESCU",
                               "--allow-ae", "ORTHANC@127.0.0.1", "--allow-ae", "BOUND@10.9.9.9",
                               "--metrics-port", "0").launch()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"),
                           modalities={"neuron": ["NEURON", "127.0.0.1", listener.port]})
    try:
        server.start()
        listener.ready()
        yield listener, server
    finally:
        kill(listener.proc)
        server.close()


@pytest.fixture(scope="module")
def listener(peers) -> ListenerProcess:
    return peers[0]


@pytest.fixture(scope="module")
def orthanc(peers) -> OrthancServer:
    return peers[1]


@pytest.fixture(scope="module")
def ts_files(tmp_path_factory, rg1) -> dict[Path, str]:
    """Seven CR instances in two studies, each in its own transfer syntax, and a CT (not screened)."""
    _need("dcmconv")
    folder = tmp_path_factory.mktemp("ts")
    files: dict[Path, str] = {}
    studies = [(generate_uid(), [generate_uid(), generate_uid()]) for _ in range(2)]
    for i, ts in enumerate(PROPOSE):
        study, series = studies[i % 2]
        files[chest(rg1, folder / f"cr{i}.dcm", 5 + i % 4, study, series[(i // 2) % 2], "20230110", ts)] = str(ts)
    from neuron.sample_data import pydicom_data_dir

    ct = folder / "ct.dcm"
    shutil.copy(pydicom_data_dir() / "693_J2KR.dcm", ct)
    files[ct] = str(JPEG2000Lossless)
    return files


def findings(db: Path, sops) -> dict:
    marks = ",".join("?" * len(sops))
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in query(
        db, f"select sop_instance_uid, frame, label, probability, rank from findings where sop_instance_uid in "
            f"({marks})", *sops)}


def run_embedded(folder: Path, out: Path, models, settings):
    """`neuron run` on FOLDER, in this process, with the session's models: the reference results."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    local = settings.with_(out_dir=out)
    run_folder(folder, local, pipeline=Pipeline(models, local))
    return out / "neuron.db"


def assert_same_findings(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for key, (p, rank) in want.items():
        assert abs(got[key][0] - p) < 1e-5 and got[key][1] == rank, key


# -- pure rules -------------------------------------------------------------------------------------------------------
def test_a_study_is_released_after_its_series_and_study_quiet_times_or_at_the_maximum_wait():
    from producer.arrivals import Arrivals, CompletenessRules, Release

    a = Arrivals(CompletenessRules(series_quiet_s=10, study_quiet_s=5, max_wait_s=100))
    a.arrived("s1", "a", now=0)
    a.arrived("s1", "b", now=8)  # a second series starts while the first is quiet
    assert a.due(17) == [] and a.next_due() == 23  # 8 + 10 (series quiet) + 5 (study quiet)
    assert a.due(23) == [("s1", Release.QUIET)] and a.waiting() == 0
    a.arrived("s1", "c", now=30)  # a late instance of a released study opens it again, on its own
    assert a.due(44) == [] and a.due(45) == [("s1", Release.QUIET)]
    for t in range(0, 100, 9):  # a modality that never stops sending
        a.arrived("s2", "a", now=t)
    assert a.due(99) == [] and a.due(100) == [("s2", Release.MAX_WAIT)]
    with pytest.raises(ConfigError, match="--max-wait 10 s is shorter than"):
        CompletenessRules(series_quiet_s=10, study_quiet_s=5, max_wait_s=10)


def test_peers_allow_lists_windows_and_queries_are_parsed_or_refused_naming_the_rule_and_the_fix():
    from neuron.dicomnet import AllowedCaller, Peer, TimeWindow, admitted
    from neuron.settings import Settings
    from producer.pull import PullQuery, storage_contexts

    assert str(Peer.parse("PACS@[::1]:104")) == "PACS@[::1]:104" and Peer.parse("P@h.example:11112").port == 11112
    for bad, says in (("PACS", "AE@HOST:PORT"), ("PACS@host", "no valid port"), ("P@h:70000", "no valid port"),
                      ("WAYTOOLONGAETITLE@h:1", "over the limit of 16"), ("A\\B@h:1", "backslash")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            Peer.parse(bad, "--send-to")
    with pytest.raises(ConfigError, match="--send-to 'PACS'"):
        Settings.from_env({"NEURON_SEND_TO": "PACS"})
    allow = [AllowedCaller.parse("CT1"), AllowedCaller.parse("PACS@127.0.0.1")]
    assert admitted(allow, "CT1", "10.1.1.1") and admitted(allow, "PACS", "127.0.0.1")
    assert not admitted(allow, "PACS", "10.1.1.1") and not admitted(allow, "MR9", "127.0.0.1")
    assert admitted([], "ANYONE", "10.1.1.1")
    night = TimeWindow.parse("20:00-06:00")
    assert night.contains(datetime(2025, 1, 1, 23, 0)) and night.contains(datetime(2025, 1, 1, 5, 59))
    assert not night.contains(datetime(2025, 1, 1, 12, 0))
    assert night.seconds_until_open(datetime(2025, 1, 1, 19, 0)) == 3600
    for bad in ("20-06", "25:00-06:00", "08:00-08:00"):
        with pytest.raises(ConfigError, match="--window"):
            TimeWindow.parse(bad)
    q = PullQuery.parse("20250101-20251231", "cr,DX", None)
    identifier = q.identifiers()[0]
    assert identifier.StudyDate == "20250101-20251231" and list(identifier.ModalitiesInStudy) == ["CR", "DX"]
    with pytest.raises(ConfigError, match="ends before it starts"):
        PullQuery.parse("20251231-20250101", None, None)
    contexts = storage_contexts([f"1.2.840.10008.5.1.4.1.1.{i}" for i in range(20)], 127)
    assert len(contexts) == 127 and contexts[0][1] == (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def test_the_in_process_feed_hands_each_instance_on_once_per_file_and_outlasts_a_database_outage(monkeypatch):
    """worker.stream's feed, on a stand-in database: a study released twice is screened once; an instance a commit
    rescued from a duplicate copy (pending again, from another file) is screened again; a release whose instances
    cannot be read for now is offered again, not dropped."""
    from neuron.errors import RetryableError
    from neuron.work import Route, WorkItem
    from worker import stream
    from worker.pipeline import IDLE

    monkeypatch.setattr(stream, "RETRY_S", 0.05)

    class Database:
        outage = 1  # the first read fails as an unreachable database does (db.store maps it to RetryableError)
        path = "/store/first.dcm"

        def pending_by_study(self, routes, studies):
            return [("s1", Route.CHEST_XRAY, "1.2.3")] if "s1" in studies else []

        def work_items(self, *, routes=None, sop_uids=None):
            if self.outage:
                self.outage -= 1
                raise RetryableError("the database is not reachable; it is tried again")
            return [WorkItem("1.2.3", self.path, Route.CHEST_XRAY)]

    db = Database()
    screening = stream.InProcessScreening(None, None, db)
    feed = screening._feed()

    def next_item():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            item = next(feed)
            if item is not IDLE:
                return item
        raise AssertionError("the feed handed nothing on")

    screening.release(["s1"])
    assert next_item() == WorkItem("1.2.3", "/store/first.dcm", Route.CHEST_XRAY)  # after the outage
    screening.release(["s1"])  # released again before its result was committed: not handed on twice
    assert next(feed) is IDLE
    db.path = "/store/copy.dcm"
    screening._rescued(["1.2.3"])  # the first copy failed; the commit moved the instance to its duplicate
    assert next_item() == WorkItem("1.2.3", "/store/copy.dcm", Route.CHEST_XRAY)
    screening._released.put(stream._CLOSE)
    assert [i for i in feed if i is not IDLE] == []


# -- receiving ------------------------------------------------------------------------------------------------------
def test_instances_received_from_storescu_in_every_transfer_syntax_give_the_findings_of_neuron_run(
        listener, ts_files, models, untrained_settings, tmp_path):
    sops = [sop_of(p) for p in ts_files]
    for i, (path, ts) in enumerate(ts_files.items()):
        code, said = storescu(listener.port, [path], *PROPOSE.get(ts, ["-xv"]))
        assert code == 0 and "Received Store Response (Success)" in said, said
        if i == 0:  # its study is complete and screened before the rest of it arrives
            wait_until(lambda: listener.count(f"sop_instance_uid = '{sops[0]}' and status = 'done'") == 1, 120,
                       "the first instance screened", [listener.proc])
    wait_until(lambda: listener.count("status in ('done', 'skipped')") >= len(sops), 180,
               "every received instance screened or skipped", [listener.proc])
    # each stored as it was sent: no transcoding
    stored = dict(query(listener.db, "select sop_instance_uid, transfer_syntax from instances"))
    assert {sop_of(p): ts for p, ts in ts_files.items()}.items() <= stored.items()
    # store names are hashes of the content, never UIDs
    for (path,) in query(listener.db, "select path from files"):
        rel = Path(path).relative_to((listener.out / "received").resolve())
        assert re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{64}\.dcm", str(rel)) and not any(s in path for s in sops)
    # the findings and statuses of `neuron run` on the same files
    folder = tmp_path / "archive"
    folder.mkdir()
    for p in ts_files:
        shutil.copy(p, folder / p.name)
    reference = run_embedded(folder, tmp_path / "run", models, untrained_settings)
    want = findings(reference, sops)
    assert len(want) == (len(sops) - 1) * N_LABELS  # the CT is not screened
    assert_same_findings(findings(listener.db, sops), want)
    status = "select sop_instance_uid, status from ingest_status where sop_instance_uid in ({})".format(
        ",".join("?" * len(sops)))
    assert dict(query(listener.db, status, *sops)) == dict(query(reference, status, *sops))
    # the first study's other instances came after it was released and screened: they were screened on their own,
    # and its summary counts them all, as the run's does
    summary = "select study_instance_uid, screened_instances, top_label from studies where screened_instances > 0"
    assert sorted(query(listener.db, summary)) == sorted(query(reference, summary))
    # the listener serves the pipeline's counters as `neuron run` does (--metrics-port 0: a free port)
    import requests

    url = re.search(r"Prometheus metrics at (http://\S+)", listener.log.read_text()).group(1)
    images = re.search(r"^neuron_images_total (\S+)$", requests.get(url, timeout=10).text, re.M).group(1)
    assert float(images) == len(sops) - 1
    # a re-send is acknowledged and changes nothing
    files_before = query(listener.db, "select count(*) from files")[0][0]
    code, said = storescu(listener.port, list(ts_files)[:2])
    assert code == 0 and said.count("(Success)") == 2, said  # acknowledged after the index: nothing to wait for
    assert query(listener.db, "select count(*) from files")[0][0] == files_before
    assert listener.count("status = 'done'") == len(sops) - 1
    # no patient name or ID in the log, the database or a file name
    text = listener.log.read_bytes() + listener.db.read_bytes()
    assert PATIENT_NAME.encode() not in text and PATIENT_ID.encode() not in text
    assert all(PATIENT_ID not in str(p) for p in listener.out.rglob("*"))


def test_an_unknown_calling_ae_or_an_allowed_one_from_another_host_is_refused_at_association_nothing_stored(
        listener, rg1, tmp_path):
    path = chest(rg1, tmp_path / "intruder.dcm", 8, generate_uid(), generate_uid(), "20230101")
    stored_before = sorted((listener.out / "received").rglob("*.dcm"))
    for aet in ("INTRUDER", "BOUND"):  # BOUND is allowed from 10.9.9.9 only
        code, said = storescu(listener.port, [path], aet=aet)
        assert code != 0 and "Calling AE Title Not Recognized" in said, said
    assert sorted((listener.out / "received").rglob("*.dcm")) == stored_before
    assert not query(listener.db, "select 1 from instances where sop_instance_uid = ?", sop_of(path))
    rejected = {r[0] for r in query(listener.db, "select calling_ae from associations where outcome = 'rejected'")}
    assert {"INTRUDER", "BOUND"} <= rejected
    import json

    status = neuron(quiet_env(), "status", "--out", str(listener.out), "--json")
    receiving = json.loads(status.stdout)["network"]["receiving"]["by_caller"]
    assert receiving["INTRUDER@127.0.0.1"]["rejected"] == 1 and receiving["STORESCU@127.0.0.1"]["instances"] >= 8
    res = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "NEURON", "127.0.0.1", str(listener.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr  # the listener still answers


def _partial_store(port: int, path: Path, how: str) -> None:
    """Send a C-STORE request and half of its data set, then abort (A-ABORT) or drop the connection."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="NEURON", max_pdu=16384)
    assert assoc.is_established
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(buffer.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = assoc.accepted_contexts[0].context_id
    pdus = list(message.encode_msg(context, assoc.acceptor.maximum_length))
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    time.sleep(0.2)  # the listener is reading the data set when the association ends
    if how == "abort":
        assoc.abort()
    else:  # the sender's process dies: the connection closes without an A-ABORT
        assoc.dul.socket.socket.shutdown(2)
        assoc.dul.socket.socket.close()
        assoc.kill()


def test_a_sender_aborting_mid_transfer_leaves_nothing_half_written(listener, rg1, tmp_path):
    big = small_chest(rg1, tmp_path / "big.dcm", step=1, PatientName=PATIENT_NAME)  # 7 MB: ~450 PDUs of 16 kB
    stored_before = sorted((listener.out / "received").rglob("*"))

    def aborted() -> int:
        return query(listener.db, "select count(*) from associations where outcome = 'aborted'")[0][0]

    before = aborted()
    for n, how in enumerate(("abort", "drop"), 1):
        _partial_store(listener.port, big, how)
        wait_until(lambda n=n: aborted() == before + n, 30, f"the {how} recorded", [listener.proc])
        assert sorted((listener.out / "received").rglob("*")) == stored_before, how
        assert not list((listener.out / "received" / ".partial").iterdir())
        assert not query(listener.db, "select 1 from instances where sop_instance_uid = ?", sop_of(big))
    outcomes = [r[0] for r in query(listener.db, "select outcome from associations order by id desc limit 2")]
    assert outcomes == ["aborted", "aborted"]
    code, said = storescu(listener.port, [big])  # the whole instance, sent again, is kept
    assert code == 0 and "(Success)" in said, said
    wait_until(lambda: listener.count(f"sop_instance_uid = '{sop_of(big)}' and status = 'done'") == 1, 120,
               "the complete instance screened", [listener.proc])


def test_what_a_killed_process_stored_but_did_not_index_is_indexed_and_a_half_written_file_removed_at_start(
        rg1, tmp_path):
    """The two windows a SIGKILL can hit on either side of the rename, made deterministic."""
    import hashlib

    from db.store import Database
    from producer.receive import InstanceStore, open_receiver

    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    store = InstanceStore.under(tmp_path / "out")
    renamed = chest(rg1, tmp_path / "renamed.dcm", 8, generate_uid(), generate_uid(), "20230101")
    target = store.path_for(hashlib.sha256(renamed.read_bytes()).hexdigest())
    target.parent.mkdir(parents=True)
    shutil.copy(renamed, target)  # renamed into the store, killed before the index commit (never acknowledged)
    (store.partial / "0123abcd.4242.1").write_bytes(renamed.read_bytes()[:5000])  # killed mid-write
    receiver = open_receiver(db, tmp_path / "out")
    receiver.indexer.close()
    assert not list(store.partial.iterdir())
    assert query(tmp_path / "neuron.db", "select sop_instance_uid, status from instances") == [
        (sop_of(renamed), "pending")]
    db.dispose()


def _mount_tmpfs(folder: Path, megabytes: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                         capture_output=True)
    return res.returncode == 0


def test_below_the_disk_watermark_or_past_the_queue_limit_instances_are_refused_out_of_resources_nothing_lost(
        rg1, tmp_path):
    from db.store import Database
    from producer.listen import ListenConfig, Listener
    from producer.receive import Admission, open_receiver

    out = tmp_path / "small-disk"
    mounted = _mount_tmpfs(out, 8)
    files = [chest(rg1, tmp_path / f"f{i}.dcm", 2, generate_uid(), generate_uid(), "20230101") for i in range(6)]
    size = files[0].stat().st_size  # about 1.8 MB each
    try:
        db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
        db.create()
        free = shutil.disk_usage(out).free
        # room for two instances above the watermark (a tmpfs of 8 MB); without one (not root): none
        watermark = free - int(2.5 * size) if mounted else free + 1
        receiver = open_receiver(db, out, Admission(min_free_bytes=watermark))
        listener = Listener(ListenConfig(port=0), receiver, db, lambda studies: None)
        listener.start()
        try:
            _, said = storescu(listener.port, files)
            accepted = said.count("Received Store Response (Success)")
            refused = said.count("Received Store Response (Refused: OutOfResources)")
            assert (accepted, refused) == ((2, 4) if mounted else (0, 6)), said
            kept = query(tmp_path / "neuron.db", "select sop_instance_uid from instances")
            assert sorted(r[0] for r in kept) == sorted(sop_of(f) for f in files[:accepted])
            for path in (out / "received").glob("??/*.dcm"):  # what was acknowledged is complete
                assert len(pydicom.dcmread(path).PixelData) == len(pydicom.dcmread(files[0]).PixelData)
            assert not list((out / "received" / ".partial").iterdir())
            # room again: the refused instances, sent again, are kept
            receiver.admission = Admission(min_free_bytes=0)
            if mounted:
                subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
            _, said = storescu(listener.port, files)
            assert said.count("(Success)") == 6, said
            assert query(tmp_path / "neuron.db", "select count(*) from instances")[0][0] == 6
            # a queue past its limit refuses too (0xA701), whatever the disk
            receiver.admission = Admission(max_backlog=6, backlog_cache_s=0)
            extra = chest(rg1, tmp_path / "extra.dcm", 6, generate_uid(), generate_uid(), "20230101")
            _, said = storescu(listener.port, [extra])
            assert "Refused: OutOfResources" in said, said
            reasons = [r[0] for r in query(tmp_path / "neuron.db", "select reason from associations")]
            assert reasons[-1].startswith("queue full") and reasons[0].startswith("disk below watermark")
        finally:
            listener.stop()
            receiver.indexer.close()
            db.dispose()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)], capture_output=True)


def _send_each(port: int, files: list[Path], acknowledged: list[str], four: threading.Event | None = None,
               go: threading.Event | None = None) -> None:
    """pynetdicom as the sender: one association, the files in turn; the SOP Instance UIDs acknowledged (0x0000).
    After the fourth acknowledgement it sets ``four`` and waits for ``go`` before sending the fifth."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.dimse_timeout = ae.network_timeout = 5  # a killed listener answers nothing: give up on it quickly
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="NEURON")
    for path in files:
        if not assoc.is_established:
            break
        rsp = assoc.send_c_store(path)
        if rsp is not None and rsp.get("Status") == 0:
            acknowledged.append(sop_of(path))
            if four is not None and len(acknowledged) == 4:
                four.set()
                go.wait(30)
    if assoc.is_established:
        assoc.release()


def test_a_listener_killed_while_receiving_screens_every_acknowledged_instance_after_restart(
        rg1, tmp_path, cache):
    out = tmp_path / "out"
    # four small instances, one of 7 MB, three small: the kill lands while the fifth is on its way (about 50 ms); the
    # rest are small, only to be sent again. The first listener's quiet times outlast it, so nothing it acknowledged
    # was screened before the kill.
    files = [chest(rg1, tmp_path / f"k{i}.dcm", 1 if i == 4 else 4, generate_uid(), generate_uid(), "20230101")
             for i in range(8)]
    first = ListenerProcess(out, cache, quiet=600).start()
    acknowledged: list[str] = []
    four, go = threading.Event(), threading.Event()
    sender = threading.Thread(target=_send_each, args=(first.port, files, acknowledged, four, go))
    sender.start()
    try:
        assert four.wait(60), "four instances were not acknowledged"
        go.set()
        time.sleep(0.02)
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        go.set()
    assert first.count("status = 'done'") == 0
    # the restart imports while the sender gives up on the dead listener (its 5 s DIMSE timeout)
    second = ListenerProcess(out, cache).launch()
    try:
        sender.join(60)
        assert 4 <= len(acknowledged) < len(files)
        second.ready()
        assert not list((out / "received" / ".partial").iterdir())  # a half-written file was removed
        for path in (out / "received").glob("??/*.dcm"):
            pydicom.dcmread(path).pixel_array  # noqa: B018 - every stored file is whole
        wanted = ",".join(f"'{s}'" for s in acknowledged)
        wait_until(lambda: second.count(f"sop_instance_uid in ({wanted}) and status = 'done'") == len(acknowledged),
                   120, "every acknowledged instance screened after the restart", [second.proc])
        again: list[str] = []
        _send_each(second.port, files, again)  # the sender tries again: everything is kept, each once
        assert len(again) == len(files)
        wait_until(lambda: second.count("status = 'done'") == len(files), 120, "every instance screened",
                   [second.proc])
        assert query(second.db, "select count(*) from files")[0][0] == len(files)
    finally:
        stop(second.proc)
    assert second.proc.returncode == 0 and "stopped" in second.log.read_text()  # SIGTERM: a graceful stop


# -- pulling and sending -----------------------------------------------------------------------------------------------
def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def test_a_pull_by_date_range_from_orthanc_screens_like_run_and_sends_the_sr_and_scs_into_the_source_study(
        orthanc, rg1, tmp_path, cache, models, untrained_settings):
    _need("dciodvfy")
    archive = tmp_path / "archive"
    a, b, old = generate_uid(), generate_uid(), generate_uid()
    wanted = [chest(rg1, archive / "a1.dcm", 5, a, generate_uid(), "20250301"),
              chest(rg1, archive / "a2.dcm", 6, a, generate_uid(), "20250301", JPEG2000Lossless),
              chest(rg1, archive / "b1.dcm", 7, b, generate_uid(), "20250615", RLELossless)]
    outside = chest(rg1, tmp_path / "old.dcm", 5, old, generate_uid(), "20240101")
    for path in [*wanted, outside]:
        orthanc.upload(path)
    out = tmp_path / "out"
    env = quiet_env(NEURON_CACHE_DIR=str(cache))
    args = ["pull", orthanc.peer, "--study-date", "20250101-20251231", "--modality", "CR", "--out", str(out),
            "--weights", "untrained", "--device", "cpu", "--batch-size", "8", "--send-to", orthanc.peer]
    pulling = run_in_background(args=[sys.executable, "-m", "neuron", *args], env=env, capture_output=True, text=True,
                                timeout=180)
    # `neuron run`'s findings on the same files, in this process while the pull runs
    reference = run_embedded(archive, tmp_path / "run", models, untrained_settings)
    res = pulling.result()
    assert res.returncode == 0, res.stderr
    assert "2 studies found" in res.stderr and "2 retrieved (3 instances" in res.stderr, res.stderr
    db = out / "neuron.db"
    assert sorted(query(db, "select study_instance_uid, status from pulls")) == sorted([(a, "retrieved"),
                                                                                         (b, "retrieved")])
    sops = [sop_of(p) for p in wanted]
    assert_same_findings(findings(db, sops), findings(reference, sops))
    assert not query(db, "select 1 from instances where sop_instance_uid = ?", sop_of(outside))
    # the SR and one SC per image went back into each source study, and pass dciodvfy
    deliveries = query(db, "select study_instance_uid, kind, status from deliveries")
    assert sorted(deliveries) == sorted([(a, "sc", "delivered")] * 2 + [(b, "sc", "delivered")]
                                        + [(a, "sr", "delivered"), (b, "sr", "delivered")]), deliveries
    for study, n_images in ((a, 2), (b, 1)):
        instances = orthanc.instances_of(study)
        outputs = [i for i in instances if i["SOPInstanceUID"] not in sops]
        assert sorted(i["SOPClassUID"] for i in outputs) == [SC_CLASS] * n_images + [SR_CLASS], outputs
        for inst in outputs:
            errors = dciodvfy_errors(orthanc.download(inst["id"], tmp_path / f"{inst['id']}.dcm"))
            assert not errors, errors
    # the same query again retrieves nothing: everything is here (Neuron's own SR and SCs in the studies too)
    from db.store import Database
    from neuron.dicomnet import Peer
    from producer.pull import PullConfig, Puller, PullQuery
    from producer.receive import open_receiver

    files_before = query(db, "select count(*) from files")[0][0]
    database = Database(f"sqlite:///{db}")
    receiver = open_receiver(database, out)
    try:
        again = Puller(PullConfig(Peer.parse(orthanc.peer)), database, receiver, lambda study: None).run(
            PullQuery.parse("20250101-20251231", "CR", None))
    finally:
        receiver.indexer.close()
        database.dispose()
    assert (again.found, again.held, again.retrieved_instances, again.failed) == (2, 2, 0, [])
    assert query(db, "select count(*) from files")[0][0] == files_before
    assert PATIENT_ID.encode() not in db.read_bytes() and PATIENT_ID not in res.stdout + res.stderr


def test_a_pull_waits_outside_its_window_retries_a_study_it_cannot_retrieve_and_finds_by_accession_number(
        orthanc, rg1, tmp_path):
    from db.store import Database
    from neuron.dicomnet import Peer, TimeWindow
    from producer.pull import PullConfig, Puller, PullQuery, find_studies
    from producer.receive import Admission, open_receiver

    study = generate_uid()
    orthanc.upload(chest(rg1, tmp_path / "w.dcm", 8, study, generate_uid(), "19990909"))
    accessions = tmp_path / "accessions.txt"
    accessions.write_text("# one per line\nACC19990909\nNOSUCHACC\n")
    found = find_studies(PullConfig(Peer.parse(orthanc.peer)), PullQuery.parse(None, None, accessions))
    assert [f.study_instance_uid for f in found] == [study]
    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    query_ = PullQuery.parse("19990909", None, None)
    # outside --window 20:00-06:00 at noon: nothing is retrieved until it opens (here: until stopped)
    receiver = open_receiver(db, tmp_path / "out")
    stop_ = threading.Event()
    threading.Timer(1.0, stop_.set).start()
    config = PullConfig(Peer.parse(orthanc.peer), window=TimeWindow.parse("20:00-06:00"))
    report = Puller(config, db, receiver, lambda s: None, clock=lambda: datetime(2025, 1, 1, 12, 0)).run(query_,
                                                                                                          stop_)
    assert (report.found, report.retrieved_studies) == (1, 0)
    assert query(tmp_path / "neuron.db", "select status, attempts from pulls") == [("found", 0)]
    receiver.indexer.close()
    # our own disk refuses everything (a watermark above the free space): each C-GET fails, is retried, then failed
    receiver = open_receiver(db, tmp_path / "out", Admission(min_free_bytes=10**18))
    try:
        report = Puller(PullConfig(Peer.parse(orthanc.peer), attempts=2, retry_s=0.1), db, receiver,
                        lambda s: None).run(query_)
    finally:
        receiver.indexer.close()
        db.dispose()
    assert report.failed and report.retrieved_studies == 0
    ((status, attempts, error),) = query(tmp_path / "neuron.db", "select status, attempts, last_error from pulls")
    assert (status, attempts) == ("failed", 2) and "C-GET" in error, error


def test_a_pull_with_move_to_has_orthanc_send_the_study_to_the_running_listener(orthanc, listener, rg1, tmp_path):
    study = generate_uid()
    files = [chest(rg1, tmp_path / f"m{i}.dcm", 6 + i, study, generate_uid(), "20220202") for i in range(2)]
    for path in files:
        orthanc.upload(path)
    res = neuron(listener.env, "pull", orthanc.peer, "--study-date", "20220202", "--move-to", "NEURON",
                 "--out", str(listener.out))
    assert res.returncode == 0 and "1 retrieved (2 instances, sent to NEURON)" in res.stderr, res.stderr
    wanted = ",".join(f"'{sop_of(p)}'" for p in files)
    wait_until(lambda: listener.count(f"sop_instance_uid in ({wanted}) and status = 'done'") == 2, 120,
               "the moved study screened by the listener", [listener.proc])
    assert ("ORTHANC", "127.0.0.1") in query(listener.db, "select calling_ae, peer_host from associations")


def test_orthanc_down_while_sending_the_outputs_are_delivered_after_it_returns(
        orthanc, rg1, tmp_path, models, untrained_settings):
    from worker.send import sending

    study = generate_uid()
    archive = tmp_path / "archive"
    for i in range(2):
        chest(rg1, archive / f"s{i}.dcm", 6 + i, study, generate_uid(), "20210101")
    out = tmp_path / "out"
    settings = untrained_settings.with_(out_dir=out, send_to=(orthanc.peer,), send_attempts=2, send_retry_s=0.2)
    orthanc.crash()
    try:
        with sending(settings) as sender:
            run_embedded(archive, out, models, settings)
        assert (sender.delivered, sender.failed) == (0, 3)  # two SCs and the SR, each tried twice
        env = quiet_env()
        status = neuron(env, "status", "--out", str(out), "--json")
        assert status.returncode == 0, status.stderr
        import json

        network = json.loads(status.stdout)["network"]
        assert network["deliveries"] == {orthanc.peer: {"failed": 3}}
        assert "connection refused" in network["last_delivery_error"] or "cannot connect" in \
            network["last_delivery_error"]
        # `neuron send --failed` while the PACS is still down: it retries with backoff and delivers once it is back
        send = subprocess.Popen([sys.executable, "-m", "neuron", "send", "--failed", "--out", str(out), "--wait",
                                 "60"], env={**env, "NEURON_SEND_ATTEMPTS": "50", "NEURON_SEND_RETRY_SECONDS": "0.3"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: (query(out / "neuron.db", "select min(attempts) from deliveries where status = "
                                  "'pending'")[0][0] or 0) >= 1, 30, "a retry that failed", [send])
    finally:
        orthanc.start()
    said, _ = send.communicate(timeout=90)
    assert send.returncode == 0 and "3 delivered, 0 failed, 0 still pending" in said, said
    classes = sorted(i["SOPClassUID"] for i in orthanc.instances_of(study))
    assert classes.count(SC_CLASS) == 2 and classes.count(SR_CLASS) == 1, classes


def test_with_a_broker_the_listener_enqueues_complete_studies_and_a_worker_screens_and_sends_them(
        env, orthanc, rg1, tmp_path, cache):
    from .test_distributed import sql, start_worker

    study = generate_uid()
    files = [chest(rg1, tmp_path / f"d{i}.dcm", 6 + i, study, generate_uid(), "20200101") for i in range(2)]
    # the worker loads its models while the listener starts and receives
    worker = start_worker({**env, "NEURON_SEND_TO": orthanc.peer, "NEURON_CACHE_DIR": str(cache)}, tmp_path, "w")
    listener = ListenerProcess(Path(env["NEURON_OUT"]), cache, env=env).start()
    try:
        code, said = storescu(listener.port, files)
        assert code == 0 and said.count("(Success)") == 2, said
        wait_until(lambda: sql(env, "select count(*) from deliveries where status = 'delivered'")[0][0] == 3, 180,
                   "the worker's SR and two SCs delivered", [worker, listener.proc])
    finally:
        kill(listener.proc)
        kill(worker)
    # the listener screened nothing: it sent the complete study to the workers as one task (Celery logs each task
    # a worker receives: "Task <name>[<id>] received")
    assert "enqueueing complete studies for the workers" in listener.log.read_text()
    received = re.findall(r"Task neuron\.screen_study\[[^\]]+\] received", (tmp_path / "w.log").read_text())
    assert len(received) == 1, received
    assert sql(env, "select status, count(*) from instances group by status") == [("done", 2)]
    classes = sorted(i["SOPClassUID"] for i in orthanc.instances_of(study))
    assert classes.count(SC_CLASS) == 2 and classes.count(SR_CLASS) == 1, classes


# -- TLS ---------------------------------------------------------------------------------------------------------------
def make_ca(folder: Path) -> dict[str, Path]:
    """A throwaway CA and two certificates it signs (openssl): the server's for 127.0.0.1, a client's."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=Neuron test CA")
    for name in ("server", "client"):
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_tls_the_listener_takes_storescu_with_a_certificate_of_its_ca_and_pull_and_send_speak_tls_to_orthanc(
        rg1, tmp_path):
    _need("openssl")
    from db.network import add_deliveries, deliveries_of
    from db.store import Database
    from neuron.dicomnet import Peer, TlsFiles
    from neuron.settings import Settings
    from producer.listen import ListenConfig, Listener
    from producer.pull import PullConfig, PullQuery, find_studies
    from producer.receive import open_receiver
    from worker.send import Sender, _output_object

    certs = make_ca(tmp_path / "pki")
    study = generate_uid()
    path = chest(rg1, tmp_path / "t.dcm", 8, study, generate_uid(), "20200303")
    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    receiver = open_receiver(db, tmp_path / "out")
    tls = TlsFiles(certs["server.crt"], certs["server.key"], certs["ca.crt"])
    listener = Listener(ListenConfig(port=0, tls=tls), receiver, db, lambda studies: None)
    listener.start()
    try:
        code, said = storescu(listener.port, [path])
        assert code != 0 and "(Success)" not in said
        code, said = storescu(listener.port, [path], "+tls", str(certs["client.key"]), str(certs["client.crt"]),
                              "+cf", str(certs["ca.crt"]))
        assert code == 0 and "(Success)" in said, said
        assert query(tmp_path / "neuron.db", "select count(*) from instances")[0][0] == 1
    finally:
        listener.stop()
        receiver.indexer.close()
    pacs = OrthancServer(tmp_path / "orthanc-tls", DicomTlsEnabled=True,
                         DicomTlsCertificate=str(certs["server.crt"]), DicomTlsPrivateKey=str(certs["server.key"]),
                         DicomTlsTrustedCertificates=str(certs["ca.crt"]), DicomTlsRemoteCertificateRequired=True)
    pacs.start()
    try:
        settings = Settings(out_dir=tmp_path / "out", database_url=f"sqlite:///{tmp_path / 'neuron.db'}",
                            tls_cert=certs["client.crt"], tls_key=certs["client.key"], tls_ca=certs["ca.crt"],
                            send_attempts=1)
        add_deliveries(db, [pacs.peer], [_output_object(path)])
        Sender(db, settings).run_once()
        assert [d["status"] for d in deliveries_of(db)] == ["delivered"], deliveries_of(db)
        found = find_studies(PullConfig(Peer.parse(pacs.peer), tls=TlsFiles(certs["client.crt"],
                                                                             certs["client.key"], certs["ca.crt"])),
                             PullQuery.parse("20200303", None, None))
        assert [s.study_instance_uid for s in found] == [study]
        with pytest.raises(Exception, match="no association|TLS"):  # the same PACS without TLS: refused
            find_studies(PullConfig(Peer.parse(pacs.peer)), PullQuery.parse("20200303", None, None))
    finally:
        pacs.close()
        db.dispose()


def test_a_study_listed_under_an_invalid_study_uid_is_refused_and_the_pull_says_the_uid_is_invalid(
        orthanc, rg1, tmp_path):
    """Orthanc stores what its REST API is given, a Study Instance UID of path segments included; the pull refuses
    the study without asking for it, and its row in `pulls` and the report say why (not "C-GET brought 0 of 1")."""
    from db.store import Database
    from neuron.dicomnet import Peer
    from producer.pull import PullConfig, Puller, PullQuery
    from producer.receive import open_receiver

    hostile = "../../neuron_escape_study"
    orthanc.upload(chest(rg1, tmp_path / "h.dcm", 8, hostile, generate_uid(), "19980808"))
    good = generate_uid()
    orthanc.upload(chest(rg1, tmp_path / "g.dcm", 8, good, generate_uid(), "19980808"))
    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    receiver = open_receiver(db, tmp_path / "out")
    try:
        report = Puller(PullConfig(Peer.parse(orthanc.peer), attempts=3, retry_s=0.1), db, receiver,
                        lambda s: None).run(PullQuery.parse("19980808", None, None))
    finally:
        receiver.indexer.close()
        db.dispose()
    assert (report.found, report.retrieved_studies) == (2, 1)
    ((uid, error),) = report.failed
    assert uid == hostile and "not a valid DICOM UID" in error and "refused" in error and "C-GET" not in error, error
    rows = dict((r[0], r[1:]) for r in query(tmp_path / "neuron.db", "select study_instance_uid, status, attempts, "
                                                                     "last_error from pulls"))
    assert rows[good][0] == "retrieved"
    status, attempts, last_error = rows[hostile]
    assert (status, attempts) == ("failed", 1) and last_error == error  # refused once, never retried
    assert not list((tmp_path / "out" / "received").glob("??/*.dcm")) or \
        query(tmp_path / "neuron.db", "select count(*) from files")[0][0] == 1  # nothing of it retrieved
