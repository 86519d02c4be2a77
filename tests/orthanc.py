"""A throwaway Orthanc (Debian's ``orthanc`` package, /usr/sbin/Orthanc) as the PACS of the network tests.

Configured by a JSON file written into its own temporary folder (storage and index there too), on free loopback ports,
with no plugins (or, with ``dicomweb=True``, Debian's ``orthanc-dicomweb`` plugin at ``dicomweb_url``; its packaged
dicomweb.json is not read, so no "Host" key makes the URLs it returns lose their port; ``users`` enforces HTTP basic
authentication, which the REST helpers here send too); the system's Orthanc (if the package started one on 4242/8042)
is never touched. REST on ``url`` loads studies into it and reads back what Neuron sent (Orthanc's REST API:
https://orthanc.uclouvain.be/book/users/rest.html). ``crash``/``start`` keep the storage, so a test can take the PACS
away and bring it back: a SIGKILL (Orthanc's index is SQLite, which survives a killed process) costs nothing, where
its graceful shutdown takes about 3.5 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import requests

from neuron.servers import free_port, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancServer:
    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict | None = None, dicomweb: bool = False,
                 users: dict[str, str] | None = None, **extra):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "neuron-test-pacs", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"), "StorageCompression": False,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": self.dicom_port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomModalities": modalities or {},
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [], "ConcurrentJobs": 2, "DicomScuTimeout": 10,
            "SaveJobs": False,
            "UnknownSopClassAccepted": False, "DeidentifyLogs": True, "HttpTimeout": 30, "StableAge": 2, **extra,
        }
        if dicomweb:
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False}
        self.auth = next(iter(users.items())) if users else None
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen | None = None

    @property
    def peer(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self) -> OrthancServer:
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config, indent=1))
        log = open(self.workdir / "orthanc.log", "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        wait_for_port(self.http_port, timeout=30)
        wait_for_port(self.dicom_port, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc did not answer on {self.url}; see {self.workdir / 'orthanc.log'}")

    def crash(self) -> None:
        """The PACS goes away at once (SIGKILL), its storage kept for ``start``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Kill it and remove its folder: nothing of a throwaway PACS needs a clean shutdown."""
        self.crash()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- REST ---------------------------------------------------------------------------------------------------------
    def upload(self, path: Path) -> dict:
        rsp = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
        rsp.raise_for_status()
        return rsp.json()

    def study_id(self, study_uid: str) -> str | None:
        rsp = requests.post(f"{self.url}/tools/lookup", data=study_uid, auth=self.auth, timeout=10)
        rsp.raise_for_status()
        found = [r["ID"] for r in rsp.json() if r["Type"] == "Study"]
        return found[0] if found else None

    def instances_of(self, study_uid: str) -> list[dict]:
        """Every instance of a study with its tags (SOPClassUID, Modality, SOPInstanceUID ...)."""
        study = self.study_id(study_uid)
        if study is None:
            return []
        rsp = requests.get(f"{self.url}/studies/{study}/instances", params={"expand": ""}, auth=self.auth, timeout=30)
        rsp.raise_for_status()
        out = []
        for inst in rsp.json():
            tags = requests.get(f"{self.url}/instances/{inst['ID']}/simplified-tags", auth=self.auth, timeout=30).json()
            out.append({"id": inst["ID"], **tags})
        return out

    def download(self, instance_id: str, dest: Path) -> Path:
        rsp = requests.get(f"{self.url}/instances/{instance_id}/file", auth=self.auth, timeout=30)
        rsp.raise_for_status()
        dest.write_bytes(rsp.content)
        return dest

    def count_instances(self) -> int:
        return len(requests.get(f"{self.url}/instances", auth=self.auth, timeout=10).json())
