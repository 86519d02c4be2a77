"""HTTP peers for DICOMweb (PS3.18: QIDO-RS search, WADO-RS retrieve, STOW-RS store): who the peer is, how Neuron
proves who it is, and one request path that times out, honours Retry-After and never writes a secret anywhere.

    WebPeer       "https://pacs.example/dicom-web": the service's base URL (no credentials in it: a command line is
                  visible to every user of the host)
    WebAccess     how to reach one peer: authentication (none, basic, a bearer token from NEURON_DICOMWEB_TOKEN or a
                  token file, OAuth2 client credentials), the CA bundle and client certificate of --tls-*, timeouts,
                  the QIDO page size; from the settings, overridden per peer by the NEURON_DICOMWEB_PEERS file
    WebClient     a requests.Session for one peer: (connect, read) timeouts on every request; 429 and 503 retried
                  after their Retry-After (RFC 9110 10.2.3), a bounded number of times; an OAuth2 token fetched before
                  it expires and once more after a 401; every failure a PeerUnavailable whose text names the peer, the
                  status and the fix, with the secrets masked
    iter_parts    a multipart/related body (RFC 2387) read part by part from the response stream, so a study is never
                  held in memory whole: at most one part (one instance) and one network chunk

Torch-free and SQL-free: ``producer.dicomweb`` (pull) and ``worker.stow`` (store-back) build on it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from neuron.errors import ConfigError, PeerUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # between two bytes of a response, not the whole transfer (requests' read timeout)
BUSY_TRIES = 5  # answers 429 / 503 taken before the request fails (the caller's own retries come on top)
RETRY_AFTER_MAX_S = 300.0  # a longer Retry-After is waited this long, then tried
TOKEN_MARGIN_S = 60.0  # an OAuth2 token is renewed this long (at most a quarter of its life) before it expires
PAGE_SIZE = 1000  # QIDO-RS limit asked for; a server may answer fewer (its own cap)
URL_MAX = 200  # the width of pulls.source and deliveries.destination


def is_web(text: str) -> bool:
    """A peer argument that names a DICOMweb service rather than AE@HOST:PORT."""
    return str(text).strip().lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class WebPeer:
    """A DICOMweb service's base URL, e.g. https://pacs.example/dicom-web (the path the studies resource hangs
    from, PS3.18 8.2)."""

    url: str

    @classmethod
    def parse(cls, text: str, what: str = "peer") -> WebPeer:
        raw = str(text).strip()
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{what} {raw!r} is not a URL ({exc}); write https://HOST[:PORT]/PATH, e.g. "
                              "https://pacs.example/dicom-web") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{what} {raw!r} is not an http(s) URL with a host; write https://HOST[:PORT]/PATH, "
                              "e.g. https://pacs.example/dicom-web")
        if parts.username or parts.password:
            raise ConfigError(f"{what}: credentials in the URL are refused (a command line is visible to every user "
                              "of the host and ends up in logs); give them in NEURON_DICOMWEB_USERNAME / "
                              "NEURON_DICOMWEB_PASSWORD, NEURON_DICOMWEB_TOKEN, --token-file or the peers file")
        if parts.query or parts.fragment:
            raise ConfigError(f"{what} {raw!r} has a query or fragment; give the service's base URL only, e.g. "
                              "https://pacs.example/dicom-web")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        url = f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"
        if len(url) > URL_MAX:
            raise ConfigError(f"{what}: a base URL of {len(url)} characters is over the {URL_MAX} that the pulls "
                              "and deliveries tables record; use a shorter host alias")
        return cls(url)

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    def __str__(self) -> str:
        return self.url


# -- how to reach a peer -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WebAccess:
    """Everything needed to talk to one DICOMweb peer. Secrets are kept out of ``repr``."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    oauth_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    connect_timeout: float = CONNECT_TIMEOUT_S
    read_timeout: float = READ_TIMEOUT_S
    page_size: int = PAGE_SIZE
    busy_tries: int = BUSY_TRIES

    def __post_init__(self) -> None:
        for name in ("token_file", "ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        given = [m for m, on in (("basic", self.username), ("bearer token", self.token or self.token_file),
                                 ("OAuth2", self.oauth_url)) if on]
        if len(given) > 1:
            raise ConfigError(f"DICOMweb authentication: {' and '.join(given)} are both set; a peer uses one (unset "
                              "the others, or set them per peer in NEURON_DICOMWEB_PEERS)")
        if self.username and self.password is None:
            raise ConfigError("NEURON_DICOMWEB_USERNAME is set without NEURON_DICOMWEB_PASSWORD; basic "
                              "authentication needs both")
        if self.oauth_url and not (self.client_id and self.client_secret):
            raise ConfigError("NEURON_DICOMWEB_OAUTH_URL needs NEURON_DICOMWEB_CLIENT_ID and "
                              "NEURON_DICOMWEB_CLIENT_SECRET (OAuth2 client credentials, RFC 6749 4.4)")
        if self.oauth_url and not is_web(self.oauth_url):
            raise ConfigError(f"NEURON_DICOMWEB_OAUTH_URL {self.oauth_url!r} is not an http(s) URL of the token "
                              "endpoint")
        if self.token_file is not None and not self.token_file.is_file():
            raise ConfigError(f"--token-file {self.token_file}: no such file; give a file holding the bearer token "
                              "(NEURON_DICOMWEB_TOKEN_FILE)")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key go together for a DICOMweb client certificate")
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                raise ConfigError(f"--tls-{name} {value}: no such file; give the PEM file's path")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("DICOMweb timeouts must be positive seconds (connect_timeout, read_timeout)")
        if self.page_size < 1:
            raise ConfigError(f"DICOMweb page_size {self.page_size} must be at least 1 (QIDO-RS limit)")

    @property
    def mode(self) -> str:
        if self.oauth_url:
            return "oauth2"
        if self.token or self.token_file:
            return "bearer"
        return "basic" if self.username else "none"

    def describe(self) -> str:
        """How the peer is reached, for `neuron status` and logs: no secret, no token."""
        return {"oauth2": f"OAuth2 client {self.client_id} at {self.oauth_url}",
                "bearer": f"bearer token from {self.token_file or 'NEURON_DICOMWEB_TOKEN'}",
                "basic": f"basic authentication as {self.username}", "none": "no authentication"}[self.mode]

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.token, self.client_secret) if s)


_PEER_KEYS = {f.name for f in fields(WebAccess)}
_SECRET_KEYS = {"password", "token", "client_secret"}


def load_peers(path: Path | None) -> dict[str, dict[str, Any]]:
    """NEURON_DICOMWEB_PEERS: a JSON object keyed by base URL, each value the WebAccess fields that differ for that
    peer, e.g. {"https://cloud.example/dicom-web": {"oauth_url": "...", "client_id": "...", "client_secret": "...",
    "page_size": 200}}. A file holding a secret must not be readable by other users."""
    if path is None:
        return {}
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"NEURON_DICOMWEB_PEERS {path}: cannot be read ({exc.strerror}); give the peers file's "
                          "path") from None
    except ValueError as exc:
        raise ConfigError(f"NEURON_DICOMWEB_PEERS {path} is not JSON ({exc}); see the README's DICOMweb "
                          "section for its shape") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"NEURON_DICOMWEB_PEERS {path}: expected an object keyed by base URL, each value an "
                          "object of settings")
    peers = {}
    for url, values in raw.items():
        unknown = set(values) - _PEER_KEYS
        if unknown:
            raise ConfigError(f"NEURON_DICOMWEB_PEERS {path}: {url}: unknown setting(s) {sorted(unknown)}; known: "
                              f"{sorted(_PEER_KEYS)}")
        if set(values) & _SECRET_KEYS and mode & 0o077:
            raise ConfigError(f"NEURON_DICOMWEB_PEERS {path} holds secrets and other users can read it (mode "
                              f"{mode & 0o777:o}); run `chmod 600 {path}`")
        peers[str(WebPeer.parse(url, "NEURON_DICOMWEB_PEERS"))] = values
    return peers


def access_for(peer: WebPeer, default: WebAccess, peers: Mapping[str, Mapping[str, Any]]) -> WebAccess:
    """The peer's own settings from the peers file over the defaults from the environment and flags; a peer with
    its own authentication does not inherit the default's."""
    own = dict(peers.get(str(peer), {}))
    if not own:
        return default
    if own.keys() & {"username", "password", "token", "token_file", "oauth_url", "client_id", "client_secret"}:
        default = replace(default, username=None, password=None, token=None, token_file=None, oauth_url=None,
                          client_id=None, client_secret=None, scope=None)
    return replace(default, **own)


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ***, as neuron.queue.mask_url does for a database URL's password."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- tokens ------------------------------------------------------------------------------------------------------------
class TokenSource:
    """The Authorization header of the next request. OAuth2 client credentials (RFC 6749 4.4, the client
    authenticated by HTTP basic as 2.3.1 prefers): a token is fetched at first use and again ``TOKEN_MARGIN_S`` (at
    most a quarter of its life) before its ``expires_in`` runs out, and at once after the peer answered 401, so a
    night's pull never runs on an expired one. A token file is read again whenever it changes (a sidecar that
    rotates it is followed)."""

    def __init__(self, access: WebAccess, clock: Callable[[], float] = time.monotonic):
        self.access, self.clock = access, clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0
        self._file_mtime: float | None = None
        self._margin = TOKEN_MARGIN_S
        self.fetched = 0  # tokens fetched from the token endpoint

    def header(self) -> dict[str, str]:
        a = self.access
        if a.mode == "basic":
            return {}  # requests' HTTPBasicAuth on the session
        if a.mode == "bearer":
            return {"Authorization": f"Bearer {self._bearer()}"}
        if a.mode == "oauth2":
            return {"Authorization": f"Bearer {self._oauth()}"}
        return {}

    def invalidate(self) -> None:
        with self._lock:
            self._expires = 0.0
            self._file_mtime = None

    def _bearer(self) -> str:
        a = self.access
        if a.token_file is None:
            return a.token or ""
        with self._lock:
            try:
                mtime = a.token_file.stat().st_mtime
                if self._token is None or mtime != self._file_mtime:
                    self._token, self._file_mtime = a.token_file.read_text().strip(), mtime
            except OSError as exc:
                raise PeerUnavailable(f"--token-file {a.token_file}: cannot be read ({exc.strerror})") from None
            return self._token

    def _oauth(self) -> str:
        a = self.access
        with self._lock:
            if self._token is not None and self.clock() < self._expires - self._margin:
                return self._token
            import requests

            data = {"grant_type": "client_credentials", **({"scope": a.scope} if a.scope else {})}
            try:
                rsp = requests.post(a.oauth_url, data=data, auth=(a.client_id, a.client_secret),
                                    timeout=(a.connect_timeout, a.read_timeout), verify=str(a.ca) if a.ca else True)
            except requests.RequestException as exc:
                raise PeerUnavailable(mask(f"OAuth2 token endpoint {a.oauth_url} could not be reached "
                                           f"({type(exc).__name__}: {exc})", a.secrets())) from None
            if rsp.status_code != 200:
                raise PeerUnavailable(f"OAuth2 token endpoint {a.oauth_url} answered {rsp.status_code} for client "
                                      f"{a.client_id}; check NEURON_DICOMWEB_CLIENT_ID / _CLIENT_SECRET and the "
                                      "scope")
            try:
                body = rsp.json()
                token, lifetime = str(body["access_token"]), float(body.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError):
                raise PeerUnavailable(f"OAuth2 token endpoint {a.oauth_url} answered without an access_token "
                                      "(RFC 6749 5.1)") from None
            self._token, self._expires = token, self.clock() + lifetime
            self._margin = min(TOKEN_MARGIN_S, lifetime / 4)  # a short-lived token is still used for most of its life
            self.fetched += 1
            log.info("OAuth2 token for client %s fetched from %s (valid %.0f s)", a.client_id, a.oauth_url,
                     lifetime)
            return token


# -- requests ----------------------------------------------------------------------------------------------------------
def retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


class WebClient:
    """Requests to one DICOMweb peer (module docstring). ``request`` returns a response with a 2xx status, or one
    whose status the caller asked to see (``accept``); anything else raises PeerUnavailable."""

    def __init__(self, peer: WebPeer, access: WebAccess, sleep: Callable[[float], None] = time.sleep):
        import requests  # here, not with the module: Settings checks --send-to URLs without loading requests

        self.peer, self.access, self.sleep = peer, access, sleep
        self.tokens = TokenSource(access)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc from the environment: the settings say how to connect
        if access.mode == "basic":
            self.session.auth = (access.username, access.password)
        self.session.verify = str(access.ca) if access.ca else True
        if access.cert is not None:
            self.session.cert = (str(access.cert), str(access.key))
        self.waited_s = 0.0  # time spent waiting on Retry-After

    def close(self) -> None:
        self.session.close()

    def url(self, path: str) -> str:
        return f"{self.peer.url}/{path.lstrip('/')}"

    def request(self, method: str, path: str, *, accept: Iterable[int] = (), **kwargs: Any) -> Any:
        import requests

        url = self.url(path)
        busy = 0
        renewed = False
        while True:
            headers = {**kwargs.pop("headers", {}), **self.tokens.header()}
            kwargs["headers"] = headers
            try:
                rsp = self.session.request(method, url, timeout=(self.access.connect_timeout,
                                                                 self.access.read_timeout), **kwargs)
            except requests.RequestException as exc:
                raise PeerUnavailable(self._masked(f"{self.peer}: {method} {path} failed ({type(exc).__name__}: "
                                                   f"{exc}); is the service up and the URL right?")) from None
            code = rsp.status_code
            if code in accept or 200 <= code < 300:
                return rsp
            if code == 401 and self.access.mode in ("oauth2", "bearer") and not renewed:
                rsp.close()
                self.tokens.invalidate()  # expired early, or revoked: one fresh token, then it is a refusal
                renewed = True
                continue
            if code in (429, 503) and busy < self.access.busy_tries - 1:
                wait = retry_after(rsp.headers.get("Retry-After"))
                wait = min(RETRY_AFTER_MAX_S, wait if wait is not None else 2.0 * 2 ** busy)
                rsp.close()
                busy += 1
                log.warning("%s answered %d to %s %s; trying again in %.1f s (%d of %d)", self.peer, code, method,
                            path, wait, busy, self.access.busy_tries - 1)
                self.waited_s += wait
                self.sleep(wait)
                continue
            raise PeerUnavailable(self._masked(self._refusal(method, path, rsp)))

    def _refusal(self, method: str, path: str, rsp: Any) -> str:
        code = rsp.status_code
        hint = {401: f"the credentials were refused ({self.access.describe()}); check them",
                403: "the credentials are not allowed to do this; ask the archive's administrator for the role",
                404: "no such resource; is the base URL the DICOMweb root (e.g. .../dicom-web)?",
                406: "the service cannot send any of the media types asked for",
                413: "the request is too large for the service; lower the STOW-RS request size",
                429: f"still too many requests after {self.access.busy_tries} tries",
                503: f"still unavailable after {self.access.busy_tries} tries"}.get(code, "see the service's log")
        text = rsp.text[:200].strip() if "json" in rsp.headers.get("Content-Type", "") or \
            "text" in rsp.headers.get("Content-Type", "") else ""
        rsp.close()
        return f"{self.peer}: {method} {path} answered {code} {rsp.reason or ''}".rstrip() + \
            f": {hint}" + (f" ({text})" if text else "")

    def _masked(self, text: str) -> str:
        return mask(text, self.access.secrets())


# -- multipart/related ----------------------------------------------------------------------------------------------
def boundary_of(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";,]+)"?', content_type or "", re.IGNORECASE)
    if not content_type.lower().startswith("multipart/") or not match:
        raise PeerUnavailable(f"expected a multipart/related answer with a boundary (PS3.18 8.7.1), got "
                              f"{content_type or 'no Content-Type'!r}")
    return match.group(1).encode()


def iter_parts(chunks: Iterable[bytes], boundary: bytes, max_part: int) -> Iterator[tuple[dict[str, str], bytearray]]:
    """The parts of a multipart body (RFC 2046 5.1.1) as they arrive: (headers with lower-case names, body). Only
    the part being read and one chunk are in memory; a part longer than ``max_part`` bytes raises PeerUnavailable
    (an answer that never ends is not read into memory)."""
    delimiter = b"\r\n--" + boundary
    source = iter(chunks)
    buf = bytearray(b"\r\n")  # the first delimiter may open the body without a CRLF before it

    def more() -> bool:
        for chunk in source:
            if chunk:
                buf.extend(chunk)
                return True
        return False

    start = 0
    while (at := buf.find(delimiter, start)) < 0:  # the preamble
        start = max(0, len(buf) - len(delimiter))
        if not more():
            raise PeerUnavailable("the multipart answer holds no part (no boundary found)")
    del buf[:at + len(delimiter)]
    while True:
        while len(buf) < 2 and more():
            pass
        if buf[:2] == b"--":
            return  # the close delimiter
        while (eol := buf.find(b"\r\n")) < 0:
            if not more():
                raise PeerUnavailable("the multipart answer ended inside a boundary line (truncated)")
        while (end := buf.find(b"\r\n\r\n", eol)) < 0:
            if len(buf) > 65536 or not more():
                raise PeerUnavailable("a part's headers never ended (truncated or not multipart)")
        headers = {}
        for line in bytes(buf[eol + 2:end]).decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        del buf[:end + 4]
        start = 0
        while (at := buf.find(delimiter, start)) < 0 and len(buf) <= max_part + len(delimiter):
            start = max(0, len(buf) - len(delimiter) + 1)
            if not more():
                raise PeerUnavailable("the multipart answer ended inside a part (truncated: the connection was "
                                      "cut or the service stopped)")
        if at < 0 or at > max_part:
            raise PeerUnavailable(f"a part is larger than {max_part} bytes; raise the limit or retrieve less at once")
        body, buf = buf, bytearray(buf[at + len(delimiter):])
        del body[at:]
        yield headers, body


def environment_access(settings: Any) -> tuple[WebAccess, dict[str, dict[str, Any]]]:
    """The default WebAccess from the settings (NEURON_DICOMWEB_*, --token-file, --tls-*) and the peers file."""
    default = WebAccess(username=settings.dicomweb_username, password=settings.dicomweb_password,
                        token=settings.dicomweb_token, token_file=settings.dicomweb_token_file,
                        oauth_url=settings.dicomweb_oauth_url, client_id=settings.dicomweb_client_id,
                        client_secret=settings.dicomweb_client_secret, scope=settings.dicomweb_scope,
                        ca=settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key)
    return default, load_peers(settings.dicomweb_peers)


def client_for(settings: Any, peer: WebPeer, sleep: Callable[[float], None] = time.sleep) -> WebClient:
    default, peers = environment_access(settings)
    return WebClient(peer, access_for(peer, default, peers), sleep)


def described_peers(settings: Any) -> dict[str, str]:
    """The DICOMweb peers the settings name (--send-to URLs and the peers file) and how each is reached, for
    `neuron status`: 'basic authentication as neuron', never a password or a token; a setting that cannot be used
    is shown as its error."""
    try:
        default, peers = environment_access(settings)
    except ConfigError as exc:
        return {"settings": str(exc)}
    urls = [u for u in settings.send_to if is_web(u)] + [u for u in peers if u not in settings.send_to]
    out = {}
    for url in urls:
        try:
            out[url] = access_for(WebPeer.parse(url), default, peers).describe()
        except ConfigError as exc:
            out[url] = str(exc)
    if not out and default.mode != "none":
        out["any DICOMweb peer"] = default.describe()
    return out
