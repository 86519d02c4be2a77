"""A loopback HTTP proxy in front of the test Orthanc's DICOMweb service, for the faults a real archive shows now and
then and Orthanc cannot be asked to: "busy" (503 or 429 with Retry-After), an OAuth2 token endpoint whose tokens
expire (and are refused once expired, as a cloud archive refuses them), an answer cut off mid-transfer (the archive
stopped), a part that is not DICOM, and the status a standard STOW-RS answer gives a partial store (202, PS3.18
10.5.3; Orthanc 1.7's plugin answers 409 with the same per-instance sequences).

Everything else is forwarded to Orthanc as it is, with Orthanc's own basic-auth credentials added by the proxy; the
bodies are Orthanc's. The proxy counts what it saw so a test can say what happened.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from neuron.servers import free_port


class FaultProxy:
    def __init__(self, upstream: str, upstream_auth: tuple[str, str] | None = None, tls=None):
        """``tls``: an ``ssl.SSLContext`` (server side) to answer over https instead of http."""
        self.upstream, self.upstream_auth = upstream.rstrip("/"), upstream_auth
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        # faults, each armed by a test
        self.busy: list[tuple[str, int, str]] = []  # (path fragment, status, Retry-After) answered once each
        self.cut_wado_after: int | None = None  # bytes of the next WADO-RS answer sent before the connection closes
        self.on_cut: Callable[[], None] | None = None
        self.junk_part = False  # every WADO-RS answer's last part is a text/html page
        self.stow_status: int | None = None  # the status of STOW-RS answers with failures
        self.oauth: dict | None = None  # {"client": (id, secret), "lifetime": s}: bearer tokens required
        # what happened
        self.tokens: dict[str, float] = {}  # token -> when it expires
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.authorizations: list[str] = []
        self.arrived: list[tuple[float, str]] = []  # (time.monotonic, path) of every request
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def do_GET(self) -> None:
                proxy._serve(self, "GET")

            def do_POST(self) -> None:
                proxy._serve(self, "POST")

        return Handler

    def _answer(self, h, status: int, body: bytes = b"", headers: dict | None = None, send: int | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        if send is not None:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body if send is None else body[:send])
        h.wfile.flush()
        with self.lock:
            self.seen.append((h.command, h.path, status))
        if send is not None:
            h.close_connection = True

    def _serve(self, h, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        path = h.path
        with self.lock:
            self.arrived.append((time.monotonic(), path))
        if path.startswith("/token"):
            return self._token(h, body)
        if self.oauth is not None:
            auth = h.headers.get("Authorization", "")
            with self.lock:
                self.authorizations.append(auth)
                expires = self.tokens.get(auth.removeprefix("Bearer "))
            if expires is None or expires < time.monotonic():
                return self._answer(h, 401, b'{"error": "invalid_token"}', {"Content-Type": "application/json",
                                                                            "WWW-Authenticate": "Bearer"})
        with self.lock:
            fault = next((f for f in self.busy if f[0] in path), None)
            if fault is not None:
                self.busy.remove(fault)
        if fault is not None:
            return self._answer(h, fault[1], b"busy", {"Retry-After": fault[2], "Content-Type": "text/plain"})
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept", "content-type")}
        try:
            rsp = requests.request(method, self.upstream + path, data=body, headers=headers,
                                   auth=self.upstream_auth, timeout=60)
        except requests.RequestException:
            return self._answer(h, 502, b"upstream down", {"Content-Type": "text/plain"})
        content, ctype = rsp.content, rsp.headers.get("Content-Type", "")
        status = rsp.status_code
        wado = method == "GET" and ctype.startswith("multipart/related")
        if wado and self.junk_part:  # the answer's last part replaced by a proxy's error page
            boundary = b"--" + ctype.split("boundary=")[1].strip('"').encode()
            segments = content.split(boundary)
            segments[-2] = b"\r\nContent-Type: text/html\r\n\r\n<html>proxy error page</html>\r\n"
            content = boundary.join(segments)
        if method == "POST" and status in (409, 202) and self.stow_status is not None:
            status = self.stow_status
        send = None
        if wado and self.cut_wado_after is not None:
            send, self.cut_wado_after = self.cut_wado_after, None
            if self.on_cut is not None:
                self.on_cut()
        return self._answer(h, status, content, {"Content-Type": ctype}, send)

    def _token(self, h, body: bytes | None) -> None:
        """RFC 6749 4.4 client credentials, the client authenticated by HTTP basic (2.3.1)."""
        client = self.oauth["client"]
        expected = "Basic " + base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        form = dict(p.split("=", 1) for p in (body or b"").decode().split("&") if "=" in p)
        if h.headers.get("Authorization") != expected or form.get("grant_type") != "client_credentials":
            return self._answer(h, 401, b'{"error": "invalid_client"}', {"Content-Type": "application/json"})
        lifetime = self.oauth["lifetime"]
        with self.lock:
            token = f"token-{len(self.tokens) + 1}"
            self.tokens[token] = time.monotonic() + lifetime
        return self._answer(h, 200, json.dumps({"access_token": token, "token_type": "Bearer",
                                                "expires_in": lifetime}).encode(),
                            {"Content-Type": "application/json"})
