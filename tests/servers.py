"""Real servers on loopback for remote-scene tests and benchmarks: nginx serving a folder (range requests,
an access log of them, a folder behind basic auth, the same folder behind expiring signed links), a proxy
that drops connections, and cloud-optimised GeoTIFFs made from real scenes."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.transform import Affine

#: The user and password of nginx's `private/` folder.
PRIVATE_USER, PRIVATE_PASSWORD = "analyst", "hunter2-secret"
#: nginx's secure_link secret of `signed/` links.
LINK_SECRET = "link-secret"
#: The bucket of the S3 server (moto) the runtime suite's ``s3`` fixture fills.
S3_BUCKET = "scenes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def make_cog(source: Path, target: Path, *, blocksize: int = 128, compress: str = "NONE", scale: int = 1) -> Path:
    """A cloud-optimised GeoTIFF of `source` (GDAL's COG driver: tiled, overviews, header first), its
    pixels `scale` times finer (nearest neighbour) for scenes bigger than the real ones."""
    with rasterio.open(source) as src:
        profile = dict(src.profile, driver="COG", BLOCKSIZE=blocksize, COMPRESS=compress, OVERVIEWS="AUTO",
                       OVERVIEW_RESAMPLING="AVERAGE", width=src.width * scale, height=src.height * scale,
                       transform=Affine(*(v / scale for v in src.transform[:2]), src.transform.c,
                                        *(v / scale for v in src.transform[3:5]), src.transform.f))
        for key in ("blockxsize", "blockysize", "tiled", "interleave", "compress"):
            profile.pop(key, None)
        data = src.read(out_shape=(src.count, src.height * scale, src.width * scale))
        with rasterio.MemoryFile() as memory:
            with memory.open(**dict(profile, driver="GTiff")) as staged:
                staged.write(data)
                staged.colorinterp = src.colorinterp
            with memory.open() as staged:
                rasterio.shutil.copy(staged, target, **{k: v for k, v in profile.items() if k.isupper()}
                                     | {"driver": "COG"})
    return target


class Nginx:
    """nginx serving `root` on 127.0.0.1 (config, pid and logs under `work`); `private/` needs basic auth;
    `signed/NAME` serves `NAME` to links signed by `signed_url` (secure_link: 403 for a bad signature, 410 once
    expired). The access log has one line per request: method, URI, status, body bytes sent, Range header."""

    def __init__(self, root: Path, work: Path):
        self.root, self.work, self.port = root, work, free_port()
        self.access_log = work / "access.log"
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (work / "htpasswd").write_text(f"{PRIVATE_USER}:{{PLAIN}}{PRIVATE_PASSWORD}\n")
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "".join(f"{name}_temp_path {work / name};\n" for name in
                       ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (work / "nginx.conf").write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {work / 'nginx.pid'};
error_log {work / 'error.log'};
events {{ worker_connections 256; }}
http {{
    log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {self.access_log} ranges;
    {temp}
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location /private/ {{
            auth_basic "scenes";
            auth_basic_user_file {work / 'htpasswd'};
        }}
        location /signed/ {{
            secure_link $arg_sig,$arg_expires;
            secure_link_md5 "$secure_link_expires$uri {LINK_SECRET}";
            if ($secure_link = "") {{ return 403; }}
            if ($secure_link = "0") {{ return 410; }}
            alias {root}/;
        }}
    }}
}}
""")
        self.process = subprocess.Popen([nginx, "-e", str(work / "error.log"), "-c", str(work / "nginx.conf"),
                                         "-p", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}") from None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def signed_url(self, name: str, expires: float) -> str:
        """A link to `name` through `signed/`, valid until the Unix time `expires` (nginx's secure_link MD5)."""
        expires = int(expires)
        digest = hashlib.md5(f"{expires}/signed/{name} {LINK_SECRET}".encode()).digest()
        sig = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        return f"{self.url('signed/' + name)}?expires={expires}&sig={sig}"

    def requests(self, name: str) -> list[tuple[str, int, int, str]]:
        """(method, status, body bytes, Range header) of each logged request for `name`."""
        rows = []
        for line in self.access_log.read_text().splitlines():
            method, uri, status, sent, ranges = line.split(" ", 4)
            if uri == "/" + name:
                rows.append((method, int(status), int(sent), ranges.strip('"')))
        return rows

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of `port` that, once `budget` response bytes have passed,
    cuts every connection (mid-response for the one that crosses it) until `budget` is raised."""

    def __init__(self, port: int, budget: int | None = None):
        self.target, self.budget, self.sent = port, budget, 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.target)) as upstream:
            threading.Thread(target=self._pipe_requests, args=(client, upstream), daemon=True).start()
            try:
                while True:
                    data = upstream.recv(16384)
                    with self._lock:
                        if not data or (self.budget is not None and self.sent >= self.budget):
                            return
                        self.sent += len(data)
                    client.sendall(data)
            finally:  # shutdown, not only close: the request thread is still blocked on the socket
                for end in (client, upstream):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    @staticmethod
    def _pipe_requests(client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(16384):
                upstream.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()
