"""DICOM on the network: ``neuron listen`` (a Storage SCP that screens what arrives), ``neuron pull`` (query and
retrieve from a PACS) and ``neuron send`` (deliver the DICOM outputs still waiting). ``--send-to`` and ``--tls-*`` are
screening options (``neuron_cli.options``), shared with run, worker and rescreen.

Each command reads its settings and hands over to a service: ``producer.listen.listen_for_workers`` and
``producer.pull.pull_without_screening`` with NEURON_BROKER_URL (or ``--move-to``), ``worker.stream``'s
``listen_in_process`` and ``pull_in_process`` otherwise, ``worker.send.send_again``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel

from neuron.errors import NeuronError
from neuron.settings import Settings, apply_cache_environment
from neuron_cli.common import (
    EXIT_OK,
    EXIT_SETUP,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    DbOpt,
    OutOpt,
    console,
    fail,
    load_models,
    open_database,
    settings_from_env,
    start_metrics,
    warn_untrained,
)
from neuron_cli.options import screening_options
from neuron_cli.screening import PATIENT_KEY_HELP, PopulationPolicyOpt, with_patient_key

AeTitleOpt = Annotated[str, typer.Option("--ae-title", help="Neuron's AE title: the listener's own, and the calling "
                                                            "AE title of pull and send. [default: NEURON; env "
                                                            "NEURON_AE_TITLE]", show_default=False)]
MinFreeOpt = Annotated[float, typer.Option("--min-free-gb", help="Refuse instances (C-STORE 0xA700, out of "
                                                                 "resources) that would leave less than this many GB "
                                                                 "free on the volume of OUT/received.")]
ReceiveOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder: received/ (the instances), "
                                                                 "neuron.db, heatmaps/. [default: ./results; env "
                                                                 "NEURON_OUT]")]
PatientKeyOpt = Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)]


def _settings(out, db, ae_title, patient_key: bool, screening: dict, population_policy=None) -> Settings:
    settings = settings_from_env(out_dir=out, database_url=db, ae_title=ae_title,
                                 population_policy=population_policy, **screening)
    return with_patient_key(settings, patient_key)


def _stop_on_signals() -> threading.Event:
    """An Event set by SIGTERM or Ctrl-C: the service finishes what it acknowledged, then returns."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _outputs_elsewhere(settings: Settings, who: str | None) -> None:
    """A process that screens nothing writes no outputs: --send-to and --fhir-out given to it would be silently
    ignored, so it says who writes them and where to set them instead."""
    if who is None:
        return
    given = [name for name, value in (("--send-to / NEURON_SEND_TO", settings.send_to),
                                      ("--fhir-out / NEURON_FHIR_OUT", settings.fhir_out)) if value]
    if given:
        console.print(f"[yellow]{' and '.join(given)}: nothing is written or sent from here; {who} screen and "
                      "write the outputs, so set them there[/]")


def _pipeline(settings: Settings):
    """The staged engine over lazily loaded models (a route's model loads with its first instance), with /metrics
    when --metrics-port is set."""
    warn_untrained(settings)
    apply_cache_environment(settings.resolved_cache_dir)
    from worker.pipeline import Pipeline

    pipeline = Pipeline(load_models(settings, lazy=True), settings)
    start_metrics(settings, pipeline)
    return pipeline


@screening_options
def listen(
    port: Annotated[int, typer.Option(help="TCP port to listen on (104 needs root).")] = 11112,
    host: Annotated[str, typer.Option(help="Address to bind. [default: 127.0.0.1; with TLS 0.0.0.0]",
                                      show_default=False)] = None,
    ae_title: AeTitleOpt = None,
    allow_ae: Annotated[list[str], typer.Option("--allow-ae", help="Accept associations only from this calling AE "
                                                                   "title, optionally bound to a host (CT1 or "
                                                                   "CT1@10.0.0.5); repeat for several. [default: any "
                                                                   "caller]", show_default=False)] = None,
    out: ReceiveOutOpt = None,
    db: DbOpt = None,
    series_quiet: Annotated[float, typer.Option(help="A series is complete once no instance of it arrived for this "
                                                     "many seconds.")] = 10.0,
    study_quiet: Annotated[float, typer.Option(help="A study is complete this many seconds after its last series "
                                                    "was.")] = 20.0,
    max_wait: Annotated[float, typer.Option(help="Screen a study this many seconds after its first instance "
                                                 "arrived, whatever still arrives (later instances are screened on "
                                                 "their own).")] = 900.0,
    min_free_gb: MinFreeOpt = 5.0,
    max_queue: Annotated[int, typer.Option(help="Refuse instances (C-STORE 0xA701, out of resources) while this many "
                                                "wait to be screened.")] = 100_000,
    max_associations: Annotated[int, typer.Option(help="Associations at once; more are rejected "
                                                       "(local limit exceeded).")] = 16,
    patient_key: PatientKeyOpt = False,
    population_policy: PopulationPolicyOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log associations, studies released and "
                                                                  "deliveries (INFO).")] = False,
    *,
    screening: dict,
) -> None:
    """Receive DICOM (C-STORE, C-ECHO) from modalities and routers and screen each study once it is complete. An
    instance is acknowledged only once it is on disk and indexed. With NEURON_BROKER_URL set, complete studies are
    enqueued for `neuron worker`s instead of screened here."""
    from neuron.dicomnet import AllowedCaller, TlsFiles, check_port_free, is_loopback
    from producer.arrivals import CompletenessRules
    from producer.listen import ListenConfig
    from producer.receive import Admission

    _logging(verbose)
    settings = _settings(out, db, ae_title, patient_key, screening, population_policy)
    try:
        tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
        if tls.enabled:
            tls.server_context()  # a bad certificate stops here, before anything binds
        config = ListenConfig(ae_title=settings.ae_title, host=host or ("0.0.0.0" if tls.enabled else "127.0.0.1"),
                              port=port, allow=tuple(AllowedCaller.parse(a) for a in allow_ae or ()), tls=tls,
                              max_associations=max_associations)
        rules = CompletenessRules(series_quiet, study_quiet, max_wait)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if not is_loopback(config.host) and not tls.enabled:
        console.print(Panel(f"binding {config.host} without TLS: instances cross the network in clear text"
                            + ("" if config.allow else " and any AE title may send") + "; use --tls-cert/--tls-key "
                            "(and --tls-ca for callers' certificates) and --allow-ae", title="WARNING",
                            style="bold yellow"))
    admission = Admission(min_free_bytes=int(min_free_gb * 1e9), max_backlog=max_queue)
    stop = _stop_on_signals()

    def ready(listener) -> None:
        mode = "enqueueing complete studies for the workers" if settings.broker_given else "screening here"
        console.print(f"listening as {config.ae_title} on {config.host}:{listener.port} ({mode}; "
                      f"{'TLS' if tls.enabled else 'no TLS'}; Ctrl-C or SIGTERM stops)")

    _outputs_elsewhere(settings, "with NEURON_BROKER_URL the workers" if settings.broker_given else None)
    try:
        check_port_free(config.host, port)  # before the models load: a taken port is said at once
        if settings.broker_given:
            from producer.listen import listen_for_workers

            listen_for_workers(settings, config, rules, admission, stop, ready=ready)
        else:
            from worker.stream import listen_in_process

            with _pipeline(settings) as pipeline:  # its reader processes and slots end with the listener
                listen_in_process(settings, config, rules, admission, pipeline, stop, ready=ready)
    except OSError as exc:
        raise fail(f"cannot listen on {config.host}:{port} ({exc.strerror or exc}): another program (a system "
                   "Orthanc, storescp) may hold the port; choose another with --port", EXIT_SETUP) from None
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    console.print("stopped")


@screening_options
def pull(
    source: Annotated[str, typer.Argument(help="The PACS to pull from: AE@HOST:PORT (DIMSE), e.g. "
                                               "PACS@pacs.example:104, or a DICOMweb service's base URL, e.g. "
                                               "https://pacs.example/dicom-web (QIDO-RS, WADO-RS).")],
    study_date: Annotated[str, typer.Option("--study-date", help="YYYYMMDD, YYYYMMDD-YYYYMMDD, or a range open at "
                                                                 "one end. [default: any date]",
                                            show_default=False)] = None,
    modality: Annotated[str, typer.Option("--modality", help="Modalities in the study, comma-separated: CR,DX. "
                                                             "[default: any]", show_default=False)] = None,
    accessions: Annotated[Path, typer.Option("--accessions", help="A text file of accession numbers, one per line. "
                                                                  "[default: any]", show_default=False)] = None,
    move_to: Annotated[str, typer.Option("--move-to", help="C-MOVE to this AE title (a running `neuron listen` the "
                                                           "PACS knows, sharing this database) instead of C-GET. "
                                                           "[default: C-GET, no PACS configuration needed]",
                                         show_default=False)] = None,
    in_flight: Annotated[int, typer.Option(help="Studies retrieved at once (so, with DICOMweb, requests at once).")
                         ] = 2,
    max_studies_per_hour: Annotated[float, typer.Option(help="Start at most this many study retrievals per hour, "
                                                             "to spare the archive. [default: no limit]",
                                                        show_default=False)] = None,
    window: Annotated[str, typer.Option(help="Retrieve only between these hours (local time), e.g. 20:00-06:00; "
                                             "paused outside. [default: any time]", show_default=False)] = None,
    attempts: Annotated[int, typer.Option(help="Tries per study before it is recorded as failed.")] = 4,
    retry_seconds: Annotated[float, typer.Option(help="Wait before a study's second try, doubled each try.")] = 10.0,
    ae_title: AeTitleOpt = None,
    out: ReceiveOutOpt = None,
    db: DbOpt = None,
    min_free_gb: MinFreeOpt = 5.0,
    patient_key: PatientKeyOpt = False,
    population_policy: PopulationPolicyOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each study's retrieval (INFO).")] = False,
    *,
    screening: dict,
) -> None:
    """Query a PACS (C-FIND, or QIDO-RS) and retrieve the matching studies (C-GET, C-MOVE to a listener, or WADO-RS),
    then screen them (or, with NEURON_BROKER_URL, enqueue them for the workers). Resumable: a second pull of the same
    query asks for nothing that is here already. Exit 3 when some studies could not be retrieved (`neuron status`,
    table pulls)."""
    from neuron.dicomnet import Peer, TimeWindow, TlsFiles
    from neuron.webclient import WebAccess, WebPeer, access_for, environment_access, is_web
    from producer.pull import PullConfig, PullQuery, transport_for
    from producer.receive import Admission

    _logging(verbose)
    settings = _settings(out, db, ae_title, patient_key, screening, population_policy)
    try:
        query = PullQuery.parse(study_date, modality, accessions)
        peer = WebPeer.parse(source, "SOURCE") if is_web(source) else Peer.parse(source, "SOURCE")
        web = access_for(peer, *environment_access(settings)) if isinstance(peer, WebPeer) else WebAccess()
        config = PullConfig(peer, settings.ae_title, TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca),
                            move_to, in_flight, TimeWindow.parse(window) if window else None, attempts,
                            retry_seconds, max_studies_per_hour, web)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    admission = Admission(min_free_bytes=int(min_free_gb * 1e9))
    _outputs_elsewhere(settings, f"with --move-to the listener ({move_to}) or its workers" if move_to else
                       "with NEURON_BROKER_URL the workers" if settings.broker_given else None)
    stop = _stop_on_signals()
    try:
        transport_for(config, None, check=True)  # an unreachable source is said before any model loads
        if settings.broker_given or move_to is not None:
            from producer.pull import pull_without_screening

            report, left = pull_without_screening(settings, config, query, admission, stop), 0
        else:
            from worker.stream import pull_in_process

            with _pipeline(settings) as pipeline:
                report, left = pull_in_process(settings, config, query, admission, pipeline, stop)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    done = ("enqueued for the workers" if settings.broker_given else
            f"sent to {move_to}" if move_to else "screened")
    console.print(f"{report.found} studies found on {config.source}: {report.retrieved_studies} retrieved "
                  f"({report.retrieved_instances} instances, {done}), {report.held} held already, "
                  f"{len(report.failed)} failed" + (f"; {left} instances still to screen (stopped)" if left else ""))
    for _, error in report.failed[:10]:
        console.print(f"[red]failed[/] {error}")
    for where in report.unlisted[:10]:
        console.print(f"[yellow]possibly incomplete[/] the source answered as many studies on {where} as it answers "
                      "to any search and cannot be asked for more; search that day by --modality or --accessions")
    raise typer.Exit(EXIT_SOME_FAILED if report.failed else EXIT_OK)


def send(
    failed: Annotated[bool, typer.Option("--failed", help="Also try the failed deliveries again, with a fresh count "
                                                          "of tries.")] = False,
    to: Annotated[list[str], typer.Option("--to", help="Only deliveries to this AE@HOST:PORT or DICOMweb URL "
                                                       "(repeatable). "
                                                       "[default: every destination]", show_default=False)] = None,
    wait: Annotated[float, typer.Option(help="Give up after this many seconds; what is left stays pending.")
                    ] = 300.0,
    ae_title: AeTitleOpt = None,
    tls_cert: Annotated[Path, typer.Option(help="PEM certificate for DICOM TLS. [default: env NEURON_TLS_CERT]",
                                           show_default=False)] = None,
    tls_key: Annotated[Path, typer.Option(help="PEM key of --tls-cert. [default: env NEURON_TLS_KEY]",
                                          show_default=False)] = None,
    tls_ca: Annotated[Path, typer.Option(help="PEM certificates that sign the destinations' certificates. "
                                              "[default: env NEURON_TLS_CA]", show_default=False)] = None,
    db: DbOpt = None,
    out: OutOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each round (INFO).")] = False,
) -> None:
    """Deliver the DICOM outputs still waiting (pending), and with --failed the failed ones too, by C-STORE or
    STOW-RS; exit 3 when some could not be delivered."""
    from neuron.dicomnet import Peer
    from neuron.webclient import WebPeer, is_web
    from worker.send import send_again

    _logging(verbose)
    settings = settings_from_env(database_url=db, out_dir=out, ae_title=ae_title, tls_cert=tls_cert, tls_key=tls_key,
                                 tls_ca=tls_ca)
    try:
        destinations = [str(WebPeer.parse(t, "--to") if is_web(t) else Peer.parse(t, "--to")) for t in to] \
            if to else None
    except NeuronError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    open_database(settings).dispose()
    try:
        again, delivered, failed_now, left = send_again(settings, failed, destinations, wait)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    console.print(f"{again} failed deliveries back in line; {delivered} delivered, {failed_now} failed, {left} "
                  "still pending")
    raise typer.Exit(EXIT_SOME_FAILED if failed_now or left else EXIT_OK)
