"""Hits: one ranked tile for one query, the tile columns it is built from and its flat properties."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import shapely

from rsmclip_geo.stac import STAC_FIELDS
from rsmclip_geo.tile_index import WINDOW_COLUMNS

#: Flat properties of a hit in every output (GeoJSON, GeoPackage, GeoParquet, the QGIS layer), in order,
#: with their Arrow type.
HIT_PROPERTIES = {
    "rank": "int32", "score": "float32", "query": "string", "scene": "string", "tile_id": "string", "scale": "int16",
    "win_col": "int32", "win_row": "int32", "win_width": "int32", "win_height": "int32",
    **{name: "string" for name in STAC_FIELDS},  # empty for scenes not from a STAC catalogue
}
#: Tile columns a hit is built from.
HIT_COLUMNS = ["tile_id", "scene", "scene_fingerprint", "scale", *WINDOW_COLUMNS, "geometry"]


@dataclass(frozen=True)
class Hit:
    """One ranked tile for one query."""

    rank: int
    score: float
    query: str
    scene: str
    scene_fingerprint: str
    tile_id: str
    scale: int
    win_col: int
    win_row: int
    win_width: int
    win_height: int
    geometry: shapely.Polygon  # EPSG:4326, lon/lat
    stac_item_id: str | None = None  # the scene's STAC fields (stac.STAC_FIELDS), for scenes of a catalogue
    collection: str | None = None
    datetime: str | None = None
    asset_href: str | None = None

    def properties(self) -> dict:
        """Flat properties for GeoJSON / GeoPackage / Parquet output."""
        values = {name: getattr(self, name) for name in HIT_PROPERTIES}
        values["score"] = round(self.score, 6)
        return values


def hits_from_table(table, scores: Sequence[float], query: str, scenes: dict[str, dict]) -> list[Hit]:
    """Hits from the HIT_COLUMNS of the kept rows (best first) and their scores; `scenes` (the index's scenes
    table) gives the STAC fields of each hit's scene."""
    columns = {name: table.column(name).to_pylist() for name in HIT_COLUMNS if name != "geometry"}
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    return [
        Hit(rank=i + 1, score=float(score), query=query, scene=columns["scene"][i],
            scene_fingerprint=columns["scene_fingerprint"][i], tile_id=columns["tile_id"][i],
            scale=int(columns["scale"][i]), win_col=int(columns["win_col"][i]), win_row=int(columns["win_row"][i]),
            win_width=int(columns["win_width"][i]), win_height=int(columns["win_height"][i]), geometry=geometries[i],
            **scenes.get(columns["scene_fingerprint"][i], {}).get("stac", {}))
        for i, score in enumerate(scores)
    ]


def hits_to_geojson(hits: Sequence) -> dict:
    """A GeoJSON FeatureCollection (EPSG:4326, lon/lat, flat properties) of ranked hits, or of anything with
    `properties()` and a lon/lat `geometry` (the changes of rsmclip_geo.change)."""
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": shapely.geometry.mapping(hit.geometry), "properties": hit.properties()}
            for hit in hits
        ],
    }
