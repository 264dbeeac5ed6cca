"""A real STAC API on loopback for the STAC tests: Debian's PostgreSQL + PostGIS with pgstac (`pypgstac`),
served by stac-fastapi-pgstac under uvicorn; and STAC items of real COGs (pystac) for the API or for a static
catalogue that nginx serves (tests/servers.py)."""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pystac
import rasterio
from rasterio.warp import transform_bounds
from servers import free_port, wait_for_port

#: The user PostgreSQL runs as when the tests run as root (it refuses root); created when missing.
PG_USER = "postgres"


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program (Debian keeps them under /usr/lib/postgresql/VERSION/bin)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def pgstac_missing() -> str | None:
    """Why the STAC API server cannot run here (software not installed), or None."""
    if not pg_bin("initdb") or not pg_bin("pg_ctl"):
        return "PostgreSQL's server is not installed (apt-get install postgresql)"
    if not glob.glob("/usr/share/postgresql/*/extension/postgis.control"):
        return "PostGIS is not installed (apt-get install postgresql-15-postgis-3)"
    for module in ("stac_fastapi.pgstac", "pypgstac", "uvicorn"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[dev]')"
    return None


class PgStacApi:
    """PostgreSQL (as PG_USER when run as root) with pgstac migrated in a temporary directory, and
    stac-fastapi-pgstac on 127.0.0.1 over it; `load` adds collections and items."""

    def __init__(self):
        self.data = Path(tempfile.mkdtemp(prefix="rsmclip-pgstac-"))  # outside pytest's 0700 tmp: PG_USER reads it
        self.pg_port, self.port = free_port(), free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"
        self.as_user = ["runuser", "-u", self._server_user(), "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.data, user=self.as_user[2])
        self._pg_started = False
        self.api = None
        try:
            self._run(pg_bin("initdb"), "-D", self.data / "db", "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
            self._run(pg_bin("pg_ctl"), "-D", self.data / "db", "-l", self.data / "postgres.log", "-w", "-o",
                      f"-p {self.pg_port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
            self._pg_started = True
            from pypgstac.db import PgstacDB
            from pypgstac.migrate import Migrate

            with PgstacDB(dsn=self.dsn) as db:
                Migrate(db).run_migration()
            env = {**os.environ, "PGUSER": "postgres", "PGPASSWORD": "unused", "PGHOST": "127.0.0.1",
                   "PGPORT": str(self.pg_port), "PGDATABASE": "postgres"}
            self.log = (self.data / "api.log").open("w")
            self.api = subprocess.Popen([sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app",
                                         "--factory", "--host", "127.0.0.1", "--port", str(self.port)],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)
            wait_for_port(self.port, timeout=60)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _server_user() -> str:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
        return PG_USER

    def _run(self, *args) -> None:
        proc = subprocess.run([*self.as_user, *map(str, args)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr or proc.stdout}")

    def load(self, collections: list[pystac.Collection], items: list[pystac.Item]) -> None:
        """Insert collections and their items into pgstac."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            loader = Loader(db=db)
            loader.load_collections(iter([c.to_dict(include_self_link=False) for c in collections]), Methods.insert)
            loader.load_items(iter([i.to_dict(include_self_link=False) for i in items]), Methods.insert)

    def stop(self) -> None:
        if self.api is not None:
            self.api.terminate()
            self.api.wait(timeout=10)
            self.log.close()
        if self._pg_started:
            self._run(pg_bin("pg_ctl"), "-D", self.data / "db", "-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


def cog_item(item_id: str, cog: Path, assets: dict[str, str], *, collection: str, datetime: str,
             cloud_cover: float | None = None) -> pystac.Item:
    """A STAC item over the footprint of `cog` (a local file) with `assets` {key: href}."""
    from datetime import datetime as Datetime

    with rasterio.open(cog) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                    [west, south]]]}
    properties = {} if cloud_cover is None else {"eo:cloud_cover": cloud_cover}
    item = pystac.Item(item_id, geometry, [west, south, east, north],
                       Datetime.fromisoformat(datetime.replace("Z", "+00:00")), properties, collection=collection)
    for key, href in assets.items():
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"]))
    return item


def collection_of(collection_id: str, items: list[pystac.Item]) -> pystac.Collection:
    """A collection whose extent covers `items`."""
    bboxes = [item.bbox for item in items]
    bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
            max(b[3] for b in bboxes)]
    times = sorted(item.datetime for item in items)
    extent = pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[times[0], times[-1]]]))
    return pystac.Collection(collection_id, f"test collection {collection_id}", extent, license="proprietary")


def write_catalogue(folder: Path, collection_id: str, items: list[pystac.Item]) -> Path:
    """A self-contained static catalogue of one collection in `folder` (asset hrefs made relative to the
    items, as published catalogues have them); its catalog.json."""
    catalog = pystac.Catalog("archive", "static test catalogue")
    collection = collection_of(collection_id, items)
    catalog.add_child(collection)
    collection.add_items(items)
    catalog.normalize_hrefs(str(folder))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return folder / "catalog.json"
