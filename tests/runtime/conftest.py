"""Fixtures of the runtime suite (no torch): the tiny bundle and the shipped default bundle loaded on the CPU;
nginx and moto's S3 server on loopback serving the requesting module's ``cogs`` folder."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from servers import S3_BUCKET, Nginx, free_port

from rsmclip_geo.bundle import DEFAULT_MODEL
from rsmclip_geo.encoders import load_model

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path):
    """The checked-in tiny bundle loaded with two threads."""
    return load_model(tiny_bundle, threads=2)


#: The demo model of 30 AID class names (fp32, 64 px): the rankings and vocabulary warnings of many tests.
DEMO_MODEL = "rsmclip-demo-aid"


@pytest.fixture(scope="session")
def demo_model():
    """The demo bundle rsmclip_geo/models/rsmclip-demo-aid loaded on the CPU."""
    return load_model(REPO_ROOT / "rsmclip_geo" / "models" / DEMO_MODEL, providers=["cpu"])


@pytest.fixture(scope="session")
def default_model():
    """The shipped default bundle (rsmclip_geo/models/DEFAULT_MODEL) loaded on the CPU."""
    return load_model(REPO_ROOT / "rsmclip_geo" / "models" / DEFAULT_MODEL, providers=["cpu"])


@pytest.fixture(scope="module")
def nginx(cogs: Path, tmp_path_factory):
    """nginx serving the module's ``cogs`` folder (range requests, basic auth, signed links; see servers.Nginx)."""
    server = Nginx(cogs, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, cogs: Path, monkeypatch):
    """A bucket on moto's S3 server holding farm.tif; GDAL and boto3 pointed at it through AWS_* variables."""
    host, port = moto_server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_S3_ENDPOINT": f"{host}:{port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    if S3_BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=S3_BUCKET)
    client.upload_file(str(cogs / "farm.tif"), S3_BUCKET, "farm.tif")
    return client
