"""DICOMweb against a real archive: Debian's Orthanc with its DICOMweb plugin (``orthanc-dicomweb``) as the PACS,
basic authentication enforced and a small LimitFindResults (Orthanc then answers a search with a few studies and
says nothing of the rest, and mis-pages ``offset``), `neuron pull https://...` and STOW-RS store-back, real forward
passes (untrained weights) on real pixels (RG1, decimated). Faults Orthanc cannot be asked for (busy answers,
expiring OAuth2 tokens, an answer cut off as the archive stops, a part that is not DICOM, a standard 202) come from a
loopback proxy in front of it (tests/webfaults.py) that forwards everything else as it is.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from neuron.errors import ConfigError, PeerUnavailable

from .conftest import run_in_background
from .orthanc import DICOMWEB_PLUGIN, ORTHANC, OrthancServer
from .test_network import (
    PATIENT_ID,
    SC_CLASS,
    SR_CLASS,
    _need,
    assert_same_findings,
    chest,
    findings,
    make_ca,
    neuron,
    query,
    quiet_env,
    run_embedded,
    sop_of,
)
from .webfaults import FaultProxy

pytestmark = pytest.mark.timeout(300)

USER, PASSWORD = "neuron", "pw-7f3a9c1e-not-in-any-log"
CAP = 2  # Orthanc's LimitFindResults: a search answers about this many studies, whatever matches


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    _need(ORTHANC)
    _need(DICOMWEB_PLUGIN)
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-web"), dicomweb=True, users={USER: PASSWORD},
                           LimitFindResults=CAP)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def proxy(archive):
    p = FaultProxy(archive.url, (USER, PASSWORD)).start()
    try:
        yield p
    finally:
        p.close()


def basic():
    from neuron.webclient import WebAccess

    return WebAccess(username=USER, password=PASSWORD)


def pull(url: str, db_path: Path, out: Path, dates: str, access=None, **config):
    """An in-process pull (no screening): the Puller over the DICOMweb transport into OUT/received."""
    from db.store import Database
    from neuron.webclient import WebPeer
    from producer.pull import PullConfig, Puller, PullQuery
    from producer.receive import open_receiver

    db = Database(f"sqlite:///{db_path}")
    db.create()
    receiver = open_receiver(db, out)
    try:
        cfg = PullConfig(WebPeer.parse(url), web=access or basic(), **{"retry_s": 0.1, **config})
        puller = Puller(cfg, db, receiver, lambda study: None)
        return puller.run(PullQuery.parse(dates, None, None)), puller.transport
    finally:
        receiver.indexer.close()
        db.dispose()


def imaging_studies(fhir: Path) -> list[str]:
    """The study identifier of each Bundle's ImagingStudy in a --fhir-out folder (tests/test_fhir.py checks the
    Bundles in depth), one entry per Bundle."""
    bundles = [json.loads(p.read_text()) for p in fhir.glob("*.json")]
    studies = [[e["resource"]["identifier"][0]["value"] for e in b.get("entry", [])
                if e["resource"]["resourceType"] == "ImagingStudy"] for b in bundles]
    assert all(len(s) == 1 for s in studies), studies
    return [s[0] for s in studies]


# -- pure rules -------------------------------------------------------------------------------------------------------
def test_urls_credentials_and_peer_files_are_parsed_or_refused_naming_the_rule_and_the_fix(tmp_path):
    from neuron.webclient import WebAccess, WebPeer, access_for, load_peers, mask, retry_after

    assert str(WebPeer.parse(" https://PACS.example:8443/dicom-web/ ")) == "https://pacs.example:8443/dicom-web"
    for text, says in (("https://user:pw@pacs/dicom-web", "credentials in the URL are refused"),
                       ("ftp://pacs/dicom-web", "not an http(s) URL"),
                       ("https://pacs/dicom-web?x=1", "has a query"),
                       ("https://pacs:99999/x", "is not a URL")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            WebPeer.parse(text)
    for kwargs, says in (({"username": "u"}, "without NEURON_DICOMWEB_PASSWORD"),
                         ({"username": "u", "password": "p", "token": "t"}, "are both set"),
                         ({"oauth_url": "https://idp/token"}, "needs NEURON_DICOMWEB_CLIENT_ID"),
                         ({"token_file": tmp_path / "none"}, "no such file")):
        with pytest.raises(ConfigError, match=says):
            WebAccess(**kwargs)
    secret = WebAccess(username="u", password="hunter2-secret")
    assert "hunter2" not in repr(secret) and secret.describe() == "basic authentication as u"
    assert mask("GET failed for u:hunter2-secret", secret.secrets()) == "GET failed for u:***"
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"https://cloud.example/dicom-web/": {"oauth_url": "https://idp/token",
                                                                      "client_id": "neuron",
                                                                      "client_secret": "s3", "page_size": 100}}))
    os.chmod(peers, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_peers(peers)
    os.chmod(peers, stat.S_IRUSR | stat.S_IWUSR)
    loaded = load_peers(peers)
    cloud = access_for(WebPeer.parse("https://cloud.example/dicom-web"), secret, loaded)
    assert (cloud.mode, cloud.page_size, cloud.username) == ("oauth2", 100, None)  # its own auth, not the default's
    assert access_for(WebPeer.parse("https://other/dicom-web"), secret, loaded) is secret
    assert retry_after("7") == 7.0 and retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("soon") is None


def test_a_multipart_answer_is_read_part_by_part_whatever_the_chunking_and_a_cut_one_is_refused(tmp_path, rg1):
    from neuron.webclient import iter_parts
    from worker.stow import MultipartFiles

    files = [chest(rg1, tmp_path / f"p{i}.dcm", 8 + i, generate_uid(), generate_uid(), "20200101") for i in range(3)]
    body = MultipartFiles(files)
    data = b"".join(iter(lambda: body.read(65536), b""))
    assert len(data) == len(body)
    boundary = body.boundary.encode()
    for size in (1, 7, 4096, len(data)):
        chunks = (data[i:i + size] for i in range(0, len(data), size))
        parts = list(iter_parts(chunks, boundary, max_part=10**7))
        assert [bytes(b) for _, b in parts] == [f.read_bytes() for f in files]
        assert all(h["content-type"] == "application/dicom" for h, _ in parts)
    with pytest.raises(PeerUnavailable, match="truncated"):
        list(iter_parts([data[:len(data) // 2]], boundary, max_part=10**7))
    with pytest.raises(PeerUnavailable, match="larger than 1000 bytes"):
        list(iter_parts([data], boundary, max_part=1000))


def test_the_commands_refuse_unusable_dicomweb_settings_before_any_model_loads(tmp_path):
    from neuron.servers import free_port

    env = quiet_env()
    res = neuron(env, "pull", "https://neuron:hunter2-in-url@pacs.example/dicom-web", "--out", str(tmp_path))
    assert res.returncode == 2 and "credentials in the URL are refused" in res.stderr, res.stderr
    assert "hunter2" not in res.stdout + res.stderr
    res = neuron(env | {"NEURON_DICOMWEB_USERNAME": "neuron"}, "run", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--send-to", "https://pacs.example/dicom-web")
    assert res.returncode == 2 and "without NEURON_DICOMWEB_PASSWORD" in res.stderr, res.stderr
    res = neuron(env, "pull", f"http://127.0.0.1:{free_port()}/dicom-web", "--move-to", "NEURON", "--out",
                 str(tmp_path))
    assert res.returncode == 2 and "--move-to asks a DIMSE PACS" in res.stderr, res.stderr
    res = neuron(env, "pull", f"http://127.0.0.1:{free_port()}/dicom-web", "--out", str(tmp_path))
    assert res.returncode == 4 and "is the service up" in res.stderr, res.stderr


# -- against Orthanc ---------------------------------------------------------------------------------------------------
def test_a_pull_over_dicomweb_lists_every_study_past_the_servers_cap_screens_like_run_and_stores_back_by_stow(
        archive, rg1, tmp_path, cache, models, untrained_settings):
    folder = tmp_path / "archive"
    studies = [generate_uid() for _ in range(5)]
    wanted = [chest(rg1, folder / f"s{i}.dcm", 5 + i % 3, study, generate_uid(), f"2025{i + 2:02d}15",
                    JPEG2000Lossless if i == 1 else pydicom.uid.ExplicitVRLittleEndian)
              for i, study in enumerate(studies)]
    wanted.append(chest(rg1, folder / "s0b.dcm", 8, studies[0], generate_uid(), "20250215"))  # a second series
    outside = chest(rg1, tmp_path / "old.dcm", 5, generate_uid(), generate_uid(), "20240101")
    for path in [*wanted, outside]:
        archive.upload(path)
    out = tmp_path / "out"
    env = quiet_env(NEURON_CACHE_DIR=str(cache), NEURON_DICOMWEB_USERNAME=USER, NEURON_DICOMWEB_PASSWORD=PASSWORD)
    pulling = run_in_background(
        args=[sys.executable, "-m", "neuron", "pull", archive.dicomweb_url, "--study-date", "20250101-20251231",
              "--modality", "CR,DX", "--out", str(out), "--weights", "untrained", "--device", "cpu", "--batch-size",
              "8", "--send-to", archive.dicomweb_url, "--fhir-out", str(tmp_path / "fhir"), "-v"],
        env=env, capture_output=True, text=True, timeout=180)
    # `neuron run`'s findings on the same files, in this process while the pull runs
    reference = run_embedded(folder, tmp_path / "run", models, untrained_settings)
    res = pulling.result()
    said = res.stdout + res.stderr
    assert res.returncode == 0, said
    assert "5 studies found" in said and "5 retrieved (6 instances, screened)" in said, said
    assert "the date range was split" in said  # Orthanc capped the first search at about CAP studies
    db = out / "neuron.db"
    assert sorted(query(db, "select study_instance_uid, status from pulls")) == sorted((s, "retrieved")
                                                                                        for s in studies)
    sops = [sop_of(p) for p in wanted]
    assert_same_findings(findings(db, sops), findings(reference, sops))
    assert not query(db, "select 1 from instances where sop_instance_uid = ?", sop_of(outside))
    deliveries = query(db, "select study_instance_uid, kind, status from deliveries")
    assert sorted(deliveries) == sorted([(s, "sc", "delivered") for s in studies] + [(studies[0], "sc", "delivered")]
                                        + [(s, "sr", "delivered") for s in studies]), deliveries
    for study in studies:
        classes = [i["SOPClassUID"] for i in archive.instances_of(study)]
        assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == (2 if study == studies[0] else 1)
    assert sorted(imaging_studies(tmp_path / "fhir")) == sorted(f"urn:oid:{s}" for s in studies)  # a Bundle each
    # a second pull asks for nothing: every study is held (Neuron's own outputs in them too)
    files_before = query(db, "select count(*) from files")[0][0]
    again, _ = pull(archive.dicomweb_url, db, out, "20250101-20251231")
    assert (again.found, again.held, again.retrieved_instances, again.failed) == (5, 5, 0, [])
    assert query(db, "select count(*) from files")[0][0] == files_before
    # secrets and patients: nowhere in what was printed or stored; `neuron status` says how the peer is reached
    status = neuron(env | {"NEURON_SEND_TO": archive.dicomweb_url}, "status", "--out", str(out), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dicomweb"] == {archive.dicomweb_url: f"basic authentication as {USER}"}
    for text in (said, status.stdout + status.stderr):
        assert PASSWORD not in text and PATIENT_ID not in text
    assert PASSWORD.encode() not in db.read_bytes() and PATIENT_ID.encode() not in db.read_bytes()


def test_the_archive_stopped_mid_retrieve_the_next_pull_asks_only_for_what_is_missing_nothing_duplicated(
        archive, proxy, rg1, tmp_path):
    study = generate_uid()
    series = generate_uid()
    files = [chest(rg1, tmp_path / f"m{i}.dcm", 4, study, series, "20190311") for i in range(4)]
    for path in files:
        archive.upload(path)
    proxy.cut_wado_after = int(files[0].stat().st_size * 1.6)  # the first instance whole, the second cut
    proxy.on_cut = archive.crash
    db, out = tmp_path / "neuron.db", tmp_path / "out"
    try:
        report, _ = pull(proxy.dicomweb_url, db, out, "20190311", attempts=1)
    finally:
        archive.start()
    ((uid, error),) = report.failed
    assert uid == study and "cut off" in error, error
    assert query(db, "select status, last_error from pulls") == [("failed", error)]
    assert query(db, "select count(*) from instances")[0][0] == 1  # what arrived whole is kept and indexed
    assert not any((out / "received" / ".partial").iterdir())
    report, _ = pull(proxy.dicomweb_url, db, out, "20190311")
    assert (report.retrieved_studies, report.retrieved_instances, report.failed) == (1, 3, [])
    wado = [p for m, p, s in proxy.seen if m == "GET" and "/instances/" in p and not p.endswith("instances")]
    assert len(wado) == 3  # the three missing instances, one by one; the first is not asked for again
    assert query(db, "select count(*), count(distinct sop_instance_uid) from instances") == [(4, 4)]
    assert query(db, "select count(*) from files")[0][0] == 4
    assert query(db, "select status, instances_retrieved from pulls") == [("retrieved", 3)]


def test_busy_answers_wait_for_retry_after_and_an_expiring_oauth2_token_is_renewed_during_the_pull(
        archive, proxy, rg1, tmp_path):
    from neuron.webclient import WebAccess

    studies = [generate_uid() for _ in range(3)]
    for i, study in enumerate(studies):
        archive.upload(chest(rg1, tmp_path / f"o{i}.dcm", 8, study, generate_uid(), f"1997050{i + 1}"))
    proxy.oauth = {"client": ("neuron-client", "client-secret-93b1"), "lifetime": 1.2}
    proxy.busy = [("/studies?", 503, "1"), ("/series/", 429, "1")]
    access = WebAccess(oauth_url=proxy.token_url, client_id="neuron-client", client_secret="client-secret-93b1")
    started = time.monotonic()
    report, transport = pull(proxy.dicomweb_url, tmp_path / "neuron.db", tmp_path / "out", "19970501-19970503",
                             access, in_flight=1, max_per_hour=3600 / 0.6)
    took = time.monotonic() - started
    assert (report.found, report.retrieved_studies, report.failed) == (3, 3, [])
    assert transport.client.waited_s == 2.0 and took >= 2.0  # each Retry-After waited, then tried again
    answered = [s for _, _, s in proxy.seen]
    assert answered.count(503) == 1 and answered.count(429) == 1
    assert transport.client.tokens.fetched >= 2 and len(proxy.tokens) == transport.client.tokens.fetched
    assert took > 1.2  # the first token expired during the pull, and no request went out with it afterwards
    assert 401 not in answered
    starts = [t for t, path in proxy.arrived if re.search(r"/studies/[^/]+/series\?", path)]  # each study's first
    assert len(starts) == 3 and all(b - a >= 0.55 for a, b in pairwise(starts))  # --max-studies-per-hour
    # a token the archive revokes before it expires: refused once (401), a new one fetched, the request answered
    from neuron.webclient import WebClient, WebPeer

    client = WebClient(WebPeer.parse(proxy.dicomweb_url), replace(access, read_timeout=30))
    client.request("GET", "studies", params={"limit": 1}).close()
    proxy.tokens.clear()
    assert client.request("GET", "studies", params={"StudyDate": "19970501"}).json()
    assert client.tokens.fetched == 2
    assert [s for _, p, s in proxy.seen if p.startswith("/dicom-web")][-2:] == [401, 200]
    proxy.oauth["client"] = ("neuron-client", "another-secret")  # the client's secret was rotated at the server
    proxy.tokens.clear()
    with pytest.raises(PeerUnavailable, match="answered 401 for client neuron-client") as refused:
        client.request("GET", "studies")
    assert "client-secret-93b1" not in str(refused.value)


def test_a_bearer_token_file_is_read_again_when_it_changes(tmp_path):
    from neuron.webclient import TokenSource, WebAccess

    token = tmp_path / "token"
    token.write_text("first-token\n")
    source = TokenSource(WebAccess(token_file=token))
    assert source.header() == {"Authorization": "Bearer first-token"}
    token.write_text("second-token-rotated\n")
    os.utime(token, (time.time() + 5, time.time() + 5))
    assert source.header() == {"Authorization": "Bearer second-token-rotated"}
    assert WebAccess(token_file=token).describe() == f"bearer token from {token}"


def test_a_study_listed_under_an_invalid_uid_is_refused_over_dicomweb_before_any_url_holds_it(
        archive, proxy, rg1, tmp_path):
    hostile = "../../neuron_escape_study"
    archive.upload(chest(rg1, tmp_path / "h.dcm", 8, hostile, generate_uid(), "19940303"))
    db = tmp_path / "neuron.db"
    report, _ = pull(proxy.dicomweb_url, db, tmp_path / "out", "19940303")
    ((uid, error),) = report.failed
    assert uid == hostile and "invalid UID" in error and "refused, nothing retrieved" in error, error
    assert query(db, "select status, attempts from pulls") == [("failed", 1)]
    assert not [p for _, p, _ in proxy.seen if "neuron_escape" in p or "/../" in p]


def test_an_https_archive_is_verified_against_the_ca_and_given_the_client_certificate(archive, rg1, tmp_path):
    from neuron.dicomnet import TlsFiles

    _need("openssl")
    pem = make_ca(tmp_path / "ca")
    server = TlsFiles(pem["server.crt"], pem["server.key"], pem["ca.crt"]).server_context()  # mutual TLS
    https = FaultProxy(archive.url, (USER, PASSWORD), tls=server).start()
    try:
        archive.upload(chest(rg1, tmp_path / "t.dcm", 8, generate_uid(), generate_uid(), "19930303"))
        mutual = replace(basic(), ca=pem["ca.crt"], cert=pem["client.crt"], key=pem["client.key"])
        report, _ = pull(https.dicomweb_url, tmp_path / "neuron.db", tmp_path / "out", "19930303", mutual)
        assert (report.found, report.retrieved_studies, report.failed) == (1, 1, [])
        for access, says in ((replace(basic(), ca=pem["ca.crt"]), r"\((SSLError|ConnectionError)"),  # no client cert
                             (replace(mutual, ca=None), "CERTIFICATE_VERIFY_FAILED")):  # the system's CAs
            with pytest.raises(PeerUnavailable, match=says):
                pull(https.dicomweb_url, tmp_path / "again.db", tmp_path / "again", "19930303", access)
    finally:
        https.close()


def test_a_part_that_is_not_dicom_is_not_stored_and_the_study_is_failed_with_the_reason(archive, proxy, rg1, tmp_path):
    study = generate_uid()
    archive.upload(chest(rg1, tmp_path / "j.dcm", 8, study, generate_uid(), "19960404"))
    proxy.junk_part = True
    db = tmp_path / "neuron.db"
    report, _ = pull(proxy.dicomweb_url, db, tmp_path / "out", "19960404", attempts=2)
    ((_, error),) = report.failed
    assert "brought 0 of 1 instances" in error and "part 1 of an answer is not a DICOM file" in error \
        and "text/html" in error, error
    assert query(db, "select status, attempts from pulls") == [("failed", 2)]
    assert query(db, "select count(*) from files")[0][0] == 0 and not list((tmp_path / "out").rglob("*.dcm"))


def test_stow_records_each_object_by_what_the_answer_says_of_it_never_a_partial_success_as_one(
        archive, proxy, rg1, tmp_path, untrained_settings):
    from db.network import add_deliveries
    from db.store import Database
    from neuron.work import OutputObject
    from worker.send import Sender

    study, stranger = generate_uid(), generate_uid()
    files = [chest(rg1, tmp_path / f"o{i}.dcm", 8, study, generate_uid(), "19950505") for i in range(2)]
    files.append(chest(rg1, tmp_path / "x.dcm", 8, stranger, generate_uid(), "19950505"))
    objects = [OutputObject(sop_of(p), SC_CLASS, study, "sc", str(p)) for p in files]  # the third is not study's
    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    proxy.stow_status = 202  # a standard partial answer through the proxy; Orthanc itself answers 409
    destinations = (proxy.dicomweb_url, archive.dicomweb_url)
    add_deliveries(db, destinations, objects)
    settings = untrained_settings.with_(out_dir=tmp_path, send_attempts=2, send_retry_s=0.1, dicomweb_username=USER,
                                        dicomweb_password=PASSWORD)
    sender = Sender(db, settings, destinations=destinations)
    left, failed = sender.finish(30)
    db.dispose()
    assert (left, failed, sender.delivered) == (0, 2, 4)
    rows = query(tmp_path / "neuron.db", "select destination, sop_instance_uid, status, attempts, last_error from "
                                         "deliveries")
    stray = sop_of(files[2])
    for destination, code in ((proxy.dicomweb_url, 202), (archive.dicomweb_url, 409)):
        mine = {r[1]: r[2:] for r in rows if r[0] == destination}
        assert mine[stray][:2] == ("failed", 2) and f"STOW-RS answered {code}" in mine[stray][2], mine[stray]
        assert all(mine[sop_of(p)][:2] == ("delivered", 1) for p in files[:2]), mine
    assert (202 in [s for m, _, s in proxy.seen if m == "POST"])
    held = {i["SOPInstanceUID"] for i in archive.instances_of(study)}
    assert {sop_of(p) for p in files[:2]} <= held and stray not in held


def test_with_a_broker_a_dicomweb_pull_enqueues_each_study_once_and_a_worker_screens_it_and_stores_back_by_stow(
        archive, env, rg1, tmp_path, cache, models, untrained_settings):
    """The distributed mode: `neuron pull https://...` with NEURON_BROKER_URL retrieves and enqueues, a `neuron
    worker --send-to https://... --fhir-out` screens, stores the SR and SCs back by STOW-RS and writes the Bundles;
    results, deliveries and pulls in PostgreSQL."""
    from .test_distributed import N_LABELS, sql, start_worker, stop, wait_until

    folder = tmp_path / "archive"
    studies = [generate_uid() for _ in range(2)]
    files = [chest(rg1, folder / f"b{i}.dcm", 6 + i, studies[i % 2], generate_uid(), "20210607") for i in range(3)]
    for path in files:
        archive.upload(path)
    secrets = {"NEURON_DICOMWEB_USERNAME": USER, "NEURON_DICOMWEB_PASSWORD": PASSWORD, "NEURON_CACHE_DIR": str(cache)}
    fhir = tmp_path / "fhir"
    # the worker loads its models while the pull runs; credentials only in its environment
    worker = start_worker({**env, **secrets}, tmp_path, "w", "--send-to", archive.dicomweb_url, "--fhir-out",
                          str(fhir))
    try:
        res = neuron({**env, **secrets, "NEURON_FHIR_OUT": str(tmp_path / "not-here")}, "pull",
                     archive.dicomweb_url, "--study-date", "20210607", "-v")
        said = res.stdout + res.stderr
        assert res.returncode == 0, said
        assert "2 studies found" in said and "2 retrieved (3 instances, enqueued for the workers)" in said, said
        assert "NEURON_FHIR_OUT: nothing is written or sent from here" in said, said  # the workers write them
        wait_until(lambda: sql(env, "select count(*) from deliveries where status = 'delivered'")[0][0] == 5
                   and len(list(fhir.glob("*.json"))) == 2, 120, "the worker's 2 SRs and 3 SCs delivered, 2 Bundles",
                   [worker])
    finally:
        stop(worker)
    log = (tmp_path / "w.log").read_text()
    sops = [sop_of(p) for p in files]
    assert sorted(sql(env, "select sop_instance_uid, status, attempts from instances")) == sorted(
        (s, "done", 1) for s in sops)  # each screened once
    assert sql(env, "select count(*), count(distinct (sop_instance_uid, label)) from predictions") == [
        (3 * N_LABELS, 3 * N_LABELS)]
    assert sorted(sql(env, "select study_instance_uid, status from pulls")) == sorted((s, "retrieved")
                                                                                      for s in studies)
    got = {(r[0], r[1], r[2]): (r[3], r[4]) for r in sql(
        env, "select sop_instance_uid, frame, label, probability, rank from findings")}
    assert_same_findings(got, findings(run_embedded(folder, tmp_path / "run", models, untrained_settings), sops))
    deliveries = sql(env, "select destination, study_instance_uid, kind, status from deliveries")
    assert sorted(deliveries) == sorted([(archive.dicomweb_url, studies[0], "sc", "delivered")] * 2
                                        + [(archive.dicomweb_url, studies[1], "sc", "delivered")]
                                        + [(archive.dicomweb_url, s, "sr", "delivered") for s in studies]), deliveries
    for study in studies:
        classes = [i["SOPClassUID"] for i in archive.instances_of(study)]
        assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == (2 if study == studies[0] else 1), classes
    assert sorted(imaging_studies(fhir)) == sorted(f"urn:oid:{s}" for s in studies)
    assert not (tmp_path / "not-here").exists()
    # the password and the patient: in no log and in no row of any table
    assert PASSWORD not in said + log and PATIENT_ID not in said + log
    tables = [r[0] for r in sql(env, "select table_name from information_schema.tables where table_schema = 'public' "
                                     "and table_type = 'BASE TABLE'")]
    assert {"deliveries", "pulls", "instances"} <= set(tables)
    for table in tables:
        for secret in (PASSWORD, PATIENT_ID):
            assert not sql(env, f'select 1 from "{table}" t where t::text like :s', s=f"%{secret}%"), table
