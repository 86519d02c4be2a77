"""DICOM networking vocabulary shared by the listener, the puller and the sender (torch-free: the standard library,
pydicom and pynetdicom only).

    AE titles and peers       "PACS@pacs.example:104", an allow-list entry "CT1" or "CT1@10.0.0.5"
    TLS                       server and client ``ssl.SSLContext``s from --tls-cert/--tls-key/--tls-ca
    transfer syntaxes         the ones Neuron reads (pydicom has a decoder for them here): what the listener
                              accepts and the puller asks for, compressed ones included, never transcoded
    status codes              the DIMSE status values Neuron answers and understands (PS3.4 Annexes B and C,
                              PS3.7 Annex C)
    time windows              "20:00-06:00": when ``neuron pull`` may retrieve

Nothing here knows about the database, the queue or the engine. Error messages name the value, the rule and the fix.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path

from neuron.errors import ConfigError, SetupError

AE_TITLE_MAX = 16  # PS3.5 6.2, value representation AE
DEFAULT_AE_TITLE = "NEURON"
DEFAULT_PORT = 11112  # the port IANA registered for DICOM beside 104, which needs root

# DIMSE status codes (PS3.7 Annex C; the C-STORE specifics in PS3.4 Table B.2-1)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources" (PS3.4 B.2.3): the disk is below the watermark
OUT_OF_RESOURCES_QUEUE = 0xA701  # the same class of refusal: the queue of instances to screen is past its limit
CANNOT_UNDERSTAND = 0xC000  # C-STORE "Error: Cannot understand" (PS3.4 Table B.2-1)
PROCESSING_FAILURE = 0x0110  # PS3.7 Annex C: a general failure the receiver could not attribute to the data
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})  # stored, with a warning (PS3.4 Table B.2-1)
PENDING_STATUSES = frozenset({0xFF00, 0xFF01})  # C-FIND / C-GET / C-MOVE still going (PS3.4 C.4)

# Explicit VR Little Endian and Implicit VR Little Endian (PS3.5 A.2, A.1): what every DICOM application accepts.
UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def readable_transfer_syntaxes() -> tuple[str, ...]:
    """The transfer syntaxes pydicom can decode on this host (its pixel data decoders and their plugins), which is
    what Neuron's readers fall back on, in the order the puller proposes them: uncompressed first, then the compressed
    ones, accepted as they come (the receiver never transcodes: what is stored is what the modality sent). A syntax
    nobody here can decode is not accepted, so the sender keeps it (or transcodes it) instead of Neuron storing what
    it would only fail. pydicom is imported here, not with the module, which every ``Settings`` imports to check
    its peers and AE title (about 0.2 s saved for commands that never touch a DICOM file)."""
    from pydicom import uid as uids
    from pydicom.pixels import get_decoder

    candidates = (
        uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian,
        uids.ExplicitVRBigEndian, uids.JPEG2000Lossless, uids.JPEG2000, uids.JPEGLosslessSV1, uids.JPEGLossless,
        uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.RLELossless, uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit,
        uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K,
    )
    readable = []
    for ts in candidates:
        try:
            if not ts.is_encapsulated or get_decoder(ts).is_available:
                readable.append(str(ts))
        except NotImplementedError:
            continue
    return tuple(readable)


def check_ae_title(value: str, what: str) -> str:
    """An AE title as DICOM defines it (PS3.5 6.2: at most 16 characters of the default repertoire, no backslash, no
    control characters; leading and trailing spaces are not significant)."""
    title = str(value).strip()
    if not title:
        raise ConfigError(f"{what}: an empty AE title is not allowed (PS3.5 6.2); give the application entity's "
                          "title, e.g. NEURON")
    if len(title) > AE_TITLE_MAX:
        raise ConfigError(f"{what}: AE title {title!r} is {len(title)} characters long, over the limit of "
                          f"{AE_TITLE_MAX} (PS3.5 6.2); use a shorter title, as configured on the peer")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ConfigError(f"{what}: AE title {title!r} has a backslash or a character outside printable ASCII "
                          "(PS3.5 6.2); use letters, digits, '-' and '_'")
    return title


def _check_host(host: str, what: str, text: str) -> str:
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-_:]+", host):
        raise ConfigError(f"{what} {text!r}: {host!r} is not a host name or address; write AE@HOST:PORT, e.g. "
                          "PACS@pacs.example:104 or PACS@[::1]:11112")
    return host


def _split_host_port(rest: str, what: str, text: str) -> tuple[str, int]:
    if rest.startswith("["):  # [IPv6]:port
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {text!r} has no valid port: write AE@HOST:PORT with PORT in 1-65535, e.g. "
                          "PACS@pacs.example:104")
    return _check_host(host, what, text), int(port)


@dataclass(frozen=True)
class Peer:
    """A remote application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "peer") -> Peer:
        """'PACS@pacs.example:104' (also 'PACS@[::1]:104')."""
        ae, sep, rest = str(text).strip().partition("@")
        if not sep:
            raise ConfigError(f"{what} {text!r} is not AE@HOST:PORT: the AE title, the host and the port are all "
                              "needed, e.g. PACS@pacs.example:104")
        host, port = _split_host_port(rest, what, text)
        return cls(check_ae_title(ae, what), host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class AllowedCaller:
    """One --allow-ae entry: a calling AE title, optionally bound to the host (an address or a name that resolves to
    it) it must call from."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        ae, sep, host = str(text).strip().partition("@")
        return cls(check_ae_title(ae, "--allow-ae"),
                   _check_host(host, "--allow-ae", text) if sep else None)

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        return self.host is None or _same_host(self.host, address)


def _same_host(expected: str, address: str) -> bool:
    try:
        if ipaddress.ip_address(expected) == ipaddress.ip_address(address):
            return True
    except ValueError:
        pass
    try:  # a name: every address it resolves to
        return address in {info[4][0] for info in socket.getaddrinfo(expected, None)}
    except OSError:
        return False


def admitted(allowed: Sequence[AllowedCaller], ae_title: str, address: str) -> bool:
    """No allow-list admits every caller; otherwise one entry must admit this AE title from this address."""
    return not allowed or any(a.admits(ae_title, address) for a in allowed)


def check_port_free(host: str, port: int) -> None:
    """Bind the address and let it go again: a port another program holds is said at once (before a listener's models
    load), naming the likely holders and the fix."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise SetupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program (a system "
                         "Orthanc, storescp, another listener) may hold the port, or the address is not this "
                         "host's; choose another with --port / --host") from exc


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class TlsFiles:
    """--tls-cert, --tls-key, --tls-ca (PEM files). The listener needs the certificate and its key, and with a CA it
    requires every caller to present a certificate that CA signed (mutual TLS). Pull and send verify the peer's
    certificate against the CA and present their own certificate when one is given."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.cert, self.key, self.ca))

    def _check(self) -> None:
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file; give the PEM file's path (NEURON_TLS_"
                                  f"{flag[6:].upper()})")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key go together: the certificate and its private key (PEM); "
                              "give both, or neither for a client without a certificate")

    def _load_chain(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"--tls-cert {self.cert} / --tls-key {self.key} could not be loaded ({exc}); they "
                              "must be a PEM certificate and its unencrypted private key") from exc

    def _load_ca(self, context: ssl.SSLContext) -> None:
        try:
            context.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"--tls-ca {self.ca} could not be loaded ({exc}); it must hold PEM certificates "
                              "of the authorities that sign your peers' certificates") from exc

    def server_context(self) -> ssl.SSLContext:
        self._check()
        if self.cert is None:
            raise ConfigError("a TLS listener needs --tls-cert and --tls-key (PEM): the certificate callers verify "
                              "and its private key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195, as PS3.15 B.9 profiles require
        self._load_chain(context)
        if self.ca is not None:
            self._load_ca(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        self._check()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            self._load_ca(context)
        else:
            context.load_default_certs()
        if self.cert is not None:
            self._load_chain(context)
        return context


def why_no_association(peer: Peer, assoc, ae_title: str, tls: bool) -> str:
    """Why an association with ``peer`` was not established, for the error and the deliveries table: rejected (with
    the peer's reason), nothing listening, or aborted after the connection (TLS on one side only, a host the peer
    refuses). A plain TCP connection tells the second from the third; it is only made after a failure."""
    if assoc is not None and assoc.is_rejected:
        rj = assoc.acceptor.primitive
        said = f"{rj.result_str}, {rj.reason_str}" if rj is not None else "no reason given"
        return (f"{peer} rejected the association ({said}): configure Neuron's AE title {ae_title!r} (and this "
                f"host) on it, and check its AE title {peer.ae_title!r}")
    try:
        with socket.create_connection((peer.host, peer.port), timeout=5):
            pass
    except OSError as exc:
        return (f"cannot connect to {peer.host}:{peer.port} ({exc.strerror or exc}): is the PACS running and "
                "listening there, and the host and port right?")
    hint = "TLS is on here and maybe not there" if tls else "the peer may expect TLS (--tls-cert/--tls-key/--tls-ca)"
    return f"{peer}: the association was aborted or timed out after connecting ({hint}, or it refuses this host)"


def status_text(status: int) -> str:
    """A DIMSE status for messages and the deliveries table: its code and what PS3.4/PS3.7 call it."""
    if status == SUCCESS:
        name = "success"
    elif status in WARNING_STATUSES:
        name = "warning (stored)"
    elif 0xA700 <= status <= 0xA7FF:
        name = "refused: out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        name = "error: data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        name = "error: cannot understand"
    elif status == 0x0122:
        name = "refused: SOP class not supported"
    elif status == 0x0124:
        name = "refused: not authorized"
    elif status == 0xFE00:
        name = "cancelled"
    elif status in PENDING_STATUSES:
        name = "pending"
    else:
        name = "failure"
    return f"0x{status:04X} ({name})"


def is_stored(status: int) -> bool:
    return status == SUCCESS or status in WARNING_STATUSES


def is_transient(status: int) -> bool:
    """Worth trying again later: out of resources (A7xx), a general processing failure (0110), not authorized
    (0124: a PACS whose configuration is being fixed). Errors that say the data set itself is wrong (A9xx, Cxxx) are
    not: the same bytes would be refused again."""
    return 0xA700 <= status <= 0xA7FF or status in (PROCESSING_FAILURE, 0x0124, 0x0122)


@dataclass(frozen=True)
class TimeWindow:
    """Hours in which ``neuron pull`` may retrieve, e.g. 20:00-06:00 (crossing midnight) or 08:00-17:00; start
    included, end excluded; local time of this host."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(text))
        if not match:
            raise ConfigError(f"--window {text!r} is not HH:MM-HH:MM (24-hour clock, local time), e.g. 20:00-06:00")
        h1, m1, h2, m2 = map(int, match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ConfigError(f"--window {text!r}: hours run 00-23 and minutes 00-59, e.g. 20:00-06:00")
        if (h1, m1) == (h2, m2):
            raise ConfigError(f"--window {text!r} starts and ends at the same time; leave --window out to pull at "
                              "any hour")
        return cls(dtime(h1, m1), dtime(h2, m2))

    def contains(self, when: datetime) -> bool:
        t = when.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def seconds_until_open(self, when: datetime) -> float:
        """0 inside the window, else the seconds until it opens."""
        if self.contains(when):
            return 0.0
        opens = when.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opens <= when:
            opens += timedelta(days=1)
        return (opens - when).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"
