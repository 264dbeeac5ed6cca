"""The provider's algorithms, one class each; every one calls ``rsmclip_geo.api`` as the CLI does."""

from __future__ import annotations

import re
from dataclasses import replace

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterString,
)

from .. import deps
from ..layers import raster_source
from .base import EXTENT, INDEX_FILTER, OUTPUT, WGS84, Parameters, RsmclipAlgorithm, is_unset, lonlat_geometries

INPUT, TILE_SIZE, TILE_UNIT, OVERLAP, SCALES, BANDS = "INPUT", "TILE_SIZE", "TILE_UNIT", "OVERLAP", "SCALES", "BANDS"
TILES, QUERIES, QUERY, SCENE, TILE_IDS, POINTS = "TILES", "QUERIES", "QUERY", "SCENE", "TILE_IDS", "POINTS"
LABELS, POSITIVE, NEGATIVE, FEEDBACK_METHOD = "LABELS", "POSITIVE", "NEGATIVE", "FEEDBACK_METHOD"
BEFORE, AFTER, DIRECTION = "BEFORE", "AFTER", "DIRECTION"
STAC, COLLECTION, DATETIME, ASSET = "STAC", "COLLECTION", "DATETIME", "ASSET"
MAX_ITEMS, MAX_CLOUD = "MAX_ITEMS", "MAX_CLOUD"
TILE_UNITS = ("pixels", "metres")
LABELS_FILTER = "Labels (*.geojson *.json);;All files (*.*)"


def tile_id_list(text: str) -> list[str]:
    """Tile ids from a text of ids separated by commas, spaces or new lines."""
    return [tile_id for tile_id in re.split(r"[\s,]+", text.strip()) if tile_id]


def query_lines(text: str) -> list[str]:
    """The queries of a text, one per non-blank line."""
    return [line for line in text.splitlines() if line.strip()]


class IndexAlgorithm(RsmclipAlgorithm):
    """Raster layers (any CRSs) -> one GeoParquet tile index: api.build_index."""

    NAME = "index"
    DISPLAY_NAME = "Index raster layers"
    HELP = ("Tiles and embeds raster layers (one or many, any CRS) into one GeoParquet tile index, as "
            "<code>rsmclip-geo index</code> does. Tile size 0 is the model's default tile size in pixels; overlap is a "
            "fraction of the tile; scales are multiples of the tile size (1,2); RGB bands are 1-based (3,2,1), "
            "empty: by colour interpretation. A cancelled run keeps its finished batches; running it again with the "
            "same output resumes.")
    MODEL_DEFAULT = "the bundled default model"
    WORDS = {"tile_size_m": TILE_SIZE, "output": OUTPUT}

    def add_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterMultipleLayers(INPUT, "Raster layers", QgsProcessing.TypeRaster))
        self.add_tiling_parameters()

    def add_tiling_parameters(self) -> None:
        """TILE_SIZE, TILE_UNIT, OVERLAP, SCALES, BANDS, the OUTPUT index and the TILES count."""
        self.addParameter(QgsProcessingParameterNumber(TILE_SIZE, "Tile size",
                                                       QgsProcessingParameterNumber.Double, defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(TILE_UNIT, "Tile size unit", list(TILE_UNITS), defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(OVERLAP, "Overlap",
                                                       QgsProcessingParameterNumber.Double, defaultValue=0.0))
        self.addParameter(QgsProcessingParameterString(SCALES, "Scales",
                                                       defaultValue="1"))
        self.addParameter(QgsProcessingParameterString(BANDS, "RGB bands", optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(OUTPUT, "Tile index",
                                                                "GeoParquet tile index (*.parquet)"))
        self.addOutput(QgsProcessingOutputNumber(TILES, "Tiles indexed"))

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        layers = self.parameterAsLayerList(parameters, INPUT, context)
        if not layers:
            raise self.fail(INPUT, "choose at least one raster layer")
        return self.build(parameters, context, feedback, [self.raster_path(layer) for layer in layers])

    def build(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
              scenes: list) -> dict:
        """api.build_index of `scenes` with the tiling parameters into OUTPUT."""
        from rsmclip_geo.api import TilingParams, build_index, load_model

        size = self.parameterAsDouble(parameters, TILE_SIZE, context)
        if size == 0:
            size_given = {}
        elif TILE_UNITS[self.parameterAsEnum(parameters, TILE_UNIT, context)] == "pixels":
            size_given = {"tile_size": int(round(size))}
        else:
            size_given = {"tile_size_m": size}
        tiling = TilingParams(**size_given, overlap=self.parameterAsDouble(parameters, OVERLAP, context),
                              scales=self.parameterAsString(parameters, SCALES, context))
        bands = self.bands(parameters, context)
        threads = self.threads(parameters, context)
        output = self.parameterAsFileOutput(parameters, OUTPUT, context)
        model = load_model(self.model_spec(parameters, context), threads=threads)
        feedback.pushInfo(f"Indexing {len(scenes)} scene(s) with {model.bundle.info.name} into {output}")
        header = build_index(scenes, output, model=model, tiling=tiling, bands=bands, progress=self.progress(feedback),
                             cancel=feedback.isCanceled, threads=threads)
        feedback.pushInfo(f"{output}: {len(header)} tiles")
        return {OUTPUT: output, TILES: len(header)}

    def raster_path(self, layer) -> str:
        """The file or remote location behind a GDAL raster layer (layers.raster_source)."""
        from rsmclip_geo.errors import RsmclipError

        try:
            return raster_source(layer)
        except RsmclipError as exc:
            raise self.fail(INPUT, str(exc)) from None

    def bands(self, parameters: Parameters, context: QgsProcessingContext) -> tuple[int, int, int] | None:
        """BANDS as 1-based (R, G, B), None when empty."""
        text = self.parameterAsString(parameters, BANDS, context).strip()
        if not text:
            return None
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise self.fail(BANDS, f"{text} is not three band numbers R,G,B; give e.g. 3,2,1")
        return int(parts[0]), int(parts[1]), int(parts[2])


class StacIndexAlgorithm(IndexAlgorithm):
    """The items of a STAC API or static catalogue -> one GeoParquet tile index: api.stac_scenes, api.build_index."""

    NAME = "stacindex"
    DISPLAY_NAME = "Index a STAC catalogue"
    HELP = ("Indexes the items of a STAC API (item search) or of a static catalogue, collection or item JSON (a URL "
            "or a file), as <code>rsmclip-geo index --stac</code> does: items of the collection, meeting the extent "
            "(any CRS, e.g. the map canvas) and the datetime interval (RFC 3339, e.g. 2023-01-01/2023-06-30, open "
            "ends ..), with cloud cover at most the maximum, at most the number of items (0: all). The asset is one "
            "RGB asset (visual) or three single-band assets R,G,B (red,green,blue or B04,B03,B02), read remotely. "
            "The index keeps each scene's item id, collection, datetime and asset link; hits carry them.")
    WORDS = {**IndexAlgorithm.WORDS, "bbox": EXTENT}

    def add_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterString(STAC, "STAC API or catalogue (URL or file)"))
        self.addParameter(QgsProcessingParameterString(COLLECTION, "Collection", optional=True))
        self.addParameter(QgsProcessingParameterExtent(EXTENT, "Extent", optional=True))
        self.addParameter(QgsProcessingParameterString(DATETIME, "Datetime interval", optional=True))
        self.addParameter(QgsProcessingParameterString(ASSET, "Asset (or R,G,B assets)", defaultValue=default_asset()))
        self.addParameter(QgsProcessingParameterNumber(MAX_ITEMS, "Maximum items (0: all)",
                                                       QgsProcessingParameterNumber.Integer, defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(MAX_CLOUD, "Maximum cloud cover (%)",
                                                       QgsProcessingParameterNumber.Double, optional=True))
        self.add_tiling_parameters()

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from rsmclip_geo.api import check_outputs, stac_scenes

        check_outputs(tile_index=self.parameterAsFileOutput(parameters, OUTPUT, context))  # before the search
        bbox = None
        if not is_unset(parameters.get(EXTENT)):
            box = self.parameterAsExtent(parameters, EXTENT, context, WGS84)
            bbox = [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()]
        max_cloud = None if is_unset(parameters.get(MAX_CLOUD)) else self.parameterAsDouble(parameters, MAX_CLOUD,
                                                                                             context)
        text = {name: self.parameterAsString(parameters, name, context).strip() or None
                for name in (STAC, COLLECTION, DATETIME, ASSET)}
        if text[STAC] is None:
            raise self.fail(STAC, "give the URL or file of a STAC API, catalogue, collection or item")
        max_items = self.parameterAsInt(parameters, MAX_ITEMS, context) or None
        scenes = stac_scenes(text[STAC], collection=text[COLLECTION], bbox=bbox, datetime=text[DATETIME],
                             asset=text[ASSET] or "", max_items=max_items, max_cloud=max_cloud)
        feedback.pushInfo(f"{text[STAC]}: {len(scenes)} item(s): {', '.join(s.item_id for s in scenes)}")
        return self.build(parameters, context, feedback, scenes)


class TextSearchAlgorithm(RsmclipAlgorithm):
    """Text queries in any of the model's languages over a tile index: api.search."""

    NAME = "textsearch"
    DISPLAY_NAME = "Text search"
    HELP = ("Finds the tiles of a tile index that best match text queries in any of the model's languages "
            "(one query per line), as <code>rsmclip-geo search</code> does. The hits are polygons in EPSG:4326 "
            "with the fields rank, score, query, scene, tile_id, scale and the tile window. Minimum score is a cosine "
            "score; the area of interest is a polygon layer or an extent, not both.")

    def add_parameters(self) -> None:
        self.add_index_parameter()
        self.addParameter(QgsProcessingParameterString(QUERIES, "Queries", multiLine=True))
        self.add_search_parameters()
        self.add_hits_output()

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        return self.search_queries(parameters, context, feedback, self.index_path(parameters, context),
                                   self.search_params(parameters, context))

    def search_queries(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                       index, params) -> dict:
        """The QUERIES searched in ``index`` (a path or a loaded index) with ``params``; the hits to OUTPUT."""
        from rsmclip_geo.api import search

        queries = query_lines(self.parameterAsString(parameters, QUERIES, context))
        if not queries:
            raise self.fail(QUERIES, "type what to look for, one query per line, e.g. aeroporto")
        result = search(index, queries, model=self.model_spec(parameters, context), params=params,
                        threads=self.threads(parameters, context))
        feedback.pushInfo(f"{len(result.hits)} hits for {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}")
        return {OUTPUT: self.write_hits(parameters, context, feedback, result.hits)}


class SimilarAlgorithm(RsmclipAlgorithm):
    """Search by example, the examples given as tile ids or as points on tiles: api.similar."""

    NAME = "similar"
    DISPLAY_NAME = "Search by example"
    HELP = ("Finds the tiles most like example tiles of the index, as <code>rsmclip-geo similar --tile</code> does: "
            "the examples are tile ids (one per line or comma-separated) and/or the tiles under the points of a "
            "point layer (where tiles overlap, the smallest tile whose centre is nearest the point). Each example's "
            "hits have the query tile:ID.")
    WORDS = {"tile_id": TILE_IDS}

    def add_parameters(self) -> None:
        self.add_index_parameter()
        self.addParameter(QgsProcessingParameterString(TILE_IDS, "Example tile ids", multiLine=True, optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(POINTS, "Example points",
                                                              [QgsProcessing.TypeVectorPoint], optional=True))
        self.add_search_parameters()
        self.add_hits_output()

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from rsmclip_geo.api import open_index, similar

        index = open_index(self.index_path(parameters, context), in_memory=True)
        tile_ids = tile_id_list(self.parameterAsString(parameters, TILE_IDS, context))
        points = self.parameterAsSource(parameters, POINTS, context)
        if points is not None:
            tile_ids += self.tiles_under(index, points, context)
        if not tile_ids:
            raise self.fail(TILE_IDS, f"give example tile ids or a layer of points on tiles ({POINTS})")
        model = self.model_spec(parameters, context)
        params = self.search_params(parameters, context)
        threads = self.threads(parameters, context)
        hits = []
        for tile_id in dict.fromkeys(tile_ids):
            if feedback.isCanceled():
                break
            hits += similar(index, tile_id=tile_id, model=model, params=params, threads=threads).hits
        feedback.pushInfo(f"{len(hits)} hits for {len(set(tile_ids))} example tile(s)")
        return {OUTPUT: self.write_hits(parameters, context, feedback, hits)}

    def tiles_under(self, index, points, context: QgsProcessingContext) -> list[str]:
        """The id of the tile under each point (api.tiles_at: the smallest tile there, then the nearest centre)."""
        import shapely
        from rsmclip_geo.api import tiles_at

        found = []
        for geometry in lonlat_geometries(points, context):
            for lon, lat in shapely.get_coordinates(geometry):
                tile_ids = tiles_at(index, float(lon), float(lat))
                if not tile_ids:
                    raise self.fail(POINTS, f"the point at lon {lon:.6f}, lat {lat:.6f} lies on no tile of "
                                            f"{index.path}; put the points on indexed tiles")
                found.append(tile_ids[0])
        return found


def default_asset() -> str:
    """The core's default STAC asset; empty when the core cannot be imported (the algorithm then refuses to run)."""
    if deps.missing_dependencies():
        return ""
    from rsmclip_geo.api import DEFAULT_ASSET

    return DEFAULT_ASSET


def feedback_methods() -> tuple[tuple[str, ...], int]:
    """The core's query refinement methods and the index of its default; none when the core cannot be
    imported (the algorithm then refuses to run)."""
    if deps.missing_dependencies():
        return (), 0
    from rsmclip_geo.api import FEEDBACK_METHODS, SearchParams

    return tuple(FEEDBACK_METHODS), FEEDBACK_METHODS.index(SearchParams().feedback_method)


class FeedbackSearchAlgorithm(TextSearchAlgorithm):
    """Text queries refined by tiles marked right or wrong: api.search with api.Labels."""

    NAME = "feedbacksearch"
    DISPLAY_NAME = "Text search with relevance feedback"
    HELP = ("Text search (one query per line) refined by tiles marked right (+) or wrong (−): the query moves "
            "towards the tiles marked right and away from those marked wrong, and the judged tiles are left out "
            "of the hits. The judgements come from a labels file (saved by the search panel's Save labels…) "
            "and/or tile ids marked right (POSITIVE) or wrong (NEGATIVE), comma-separated or one per line; an id "
            "given here overrides the file's label of that tile. Refinement: linear (a classifier over the tile "
            "embeddings kept close to the query) or rocchio.")
    WORDS = {"labels_file": LABELS}

    def add_parameters(self) -> None:
        self.add_index_parameter()
        self.addParameter(QgsProcessingParameterString(QUERIES, "Queries", multiLine=True))
        self.addParameter(QgsProcessingParameterFile(LABELS, "Labels file", QgsProcessingParameterFile.File,
                                                     fileFilter=LABELS_FILTER, optional=True))
        self.addParameter(QgsProcessingParameterString(POSITIVE, "Tiles marked right (ids)", multiLine=True,
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(NEGATIVE, "Tiles marked wrong (ids)", multiLine=True,
                                                       optional=True))
        methods, default = feedback_methods()
        self.addParameter(QgsProcessingParameterEnum(FEEDBACK_METHOD, "Refinement", list(methods),
                                                     defaultValue=default))
        self.add_search_parameters()
        self.add_hits_output()

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from rsmclip_geo.api import FEEDBACK_METHODS, open_index

        index = open_index(self.index_path(parameters, context), in_memory=True)
        labels = self.labels(parameters, context, index)
        method = FEEDBACK_METHODS[self.parameterAsEnum(parameters, FEEDBACK_METHOD, context)]
        feedback.pushInfo(f"Queries refined by {len(labels)} judged tile(s) ({method})")
        params = replace(self.search_params(parameters, context), labels=labels, feedback_method=method)
        return self.search_queries(parameters, context, feedback, index, params)

    def labels(self, parameters: Parameters, context: QgsProcessingContext, index):
        """The labels of the LABELS file, then the POSITIVE and NEGATIVE tile ids of ``index``."""
        from rsmclip_geo.api import Labels

        path = self.parameterAsFile(parameters, LABELS, context)
        labels = (Labels.read(path) if path else Labels()).mark_ids(
            index, tile_id_list(self.parameterAsString(parameters, POSITIVE, context)),
            tile_id_list(self.parameterAsString(parameters, NEGATIVE, context)))
        if not labels:
            raise self.fail(LABELS, f"give a labels file or tile ids marked right ({POSITIVE}) or wrong "
                                    f"({NEGATIVE})")
        return labels


class HeatmapAlgorithm(RsmclipAlgorithm):
    """Every tile's score for a query as a float32 GeoTIFF in the scene's CRS: api.search + api.write_heatmap."""

    NAME = "heatmap"
    DISPLAY_NAME = "Score heatmap"
    HELP = ("Scores every tile of the index against a text query and writes a float32 GeoTIFF in the scene's CRS, "
            "each pixel the mean score of the tiles covering it (NaN where none was kept), as "
            "<code>rsmclip-geo search --heatmap</code> does. An index of several scenes needs the scene "
            "(its path or file name as indexed).")
    WORDS = {"heatmap": OUTPUT, "output": OUTPUT}

    def add_parameters(self) -> None:
        self.add_index_parameter()
        self.addParameter(QgsProcessingParameterString(QUERY, "Query"))
        self.addParameter(QgsProcessingParameterString(SCENE, "Scene", optional=True))
        self.addParameter(QgsProcessingParameterRasterDestination(OUTPUT, "Heatmap"))

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from rsmclip_geo.api import check_outputs, open_index, search, write_heatmap

        path = self.index_path(parameters, context)
        output = self.parameterAsOutputLayer(parameters, OUTPUT, context)
        scene = self.parameterAsString(parameters, SCENE, context).strip() or None
        index = open_index(path, in_memory=True)
        check_outputs(heatmap=output, index=index, scene=scene, inputs=[path])
        result = search(index, [self.parameterAsString(parameters, QUERY, context)],
                        model=self.model_spec(parameters, context), scores=True,
                        threads=self.threads(parameters, context))
        write_heatmap(result, output, scene=scene)
        return {OUTPUT: output}


def change_directions() -> tuple[str, ...]:
    """The core's change directions, its default ("appeared") first; none when the core cannot be imported (the
    algorithm then refuses to run)."""
    if deps.missing_dependencies():
        return ()
    from rsmclip_geo.api import CHANGE_DIRECTIONS

    return tuple(CHANGE_DIRECTIONS)


class ChangeAlgorithm(RsmclipAlgorithm):
    """What appeared or disappeared between the dates of two tile indexes of the same model: api.change."""

    NAME = "change"
    DISPLAY_NAME = "Change between dates"
    HELP = ("Matches the tiles of two tile indexes of the same model by footprint (the same grid, else the largest "
            "overlap of at least half their union) and ranks the pairs by the rise of each query's score from the "
            "before date to the after date (direction appeared) or by its fall (disappeared), as "
            "<code>rsmclip-geo change</code> does. Without a query, the pairs are ranked by how far their embeddings "
            "moved (what changed most; no direction). The changes are the after tiles' footprints in EPSG:4326 with "
            "the fields rank, rise, score_before, score_after, query, scene_before, tile_before, scene, tile_id, "
            "scale, the tile window and iou. Minimum rise applies to the rise (or embedding distance); the area of "
            "interest to the after tiles.")

    def add_parameters(self) -> None:
        for name, description in ((BEFORE, "Tile index before"), (AFTER, "Tile index after")):
            self.addParameter(QgsProcessingParameterFile(name, description, QgsProcessingParameterFile.File,
                                                         fileFilter=INDEX_FILTER))
        self.addParameter(QgsProcessingParameterString(QUERIES, "Queries (empty: any change)", multiLine=True,
                                                       optional=True))
        self.addParameter(QgsProcessingParameterEnum(DIRECTION, "Direction", list(change_directions()),
                                                     defaultValue=0))
        self.add_search_parameters(top_k="Changes per query", threshold="Minimum rise")
        self.add_hits_output("Changes")

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from rsmclip_geo.api import CHANGE_DIRECTIONS, CHANGE_PROPERTIES, change

        queries = query_lines(self.parameterAsString(parameters, QUERIES, context)) or None
        direction = CHANGE_DIRECTIONS[self.parameterAsEnum(parameters, DIRECTION, context)]
        params = self.search_params(parameters, context)
        feedback.pushInfo(f"Ranking what {direction} for {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}"
                          if queries else "Ranking the tiles by how far their embeddings moved")
        result = change(self.parameterAsFile(parameters, BEFORE, context),
                        self.parameterAsFile(parameters, AFTER, context), queries,
                        model=self.model_spec(parameters, context), params=params, direction=direction,
                        threads=self.threads(parameters, context))
        feedback.pushInfo(f"{len(result.changes)} changes of {result.matched} tile pairs matched by footprint")
        return {OUTPUT: self.write_hits(parameters, context, feedback, result.changes, CHANGE_PROPERTIES)}


ALGORITHMS = (IndexAlgorithm, StacIndexAlgorithm, TextSearchAlgorithm, SimilarAlgorithm, FeedbackSearchAlgorithm,
              HeatmapAlgorithm, ChangeAlgorithm)
