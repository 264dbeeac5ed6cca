"""Image and text encoders over a bundle: ONNX Runtime sessions (default) or an optional torch backend.

Sessions are created lazily per tower, so indexing never loads the text tower. Providers: CUDA when
onnxruntime's CUDA provider actually loads, else CPU; ``providers=["cpu"]`` / ``["cuda"]`` (or full
onnxruntime provider names) forces a choice. The torch backend (``backend="torch"``) runs a bundle's
``weights.safetensors`` with open_clip and is the only place torch is imported, lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from rsmclip_geo.bundle import IMAGE_ONNX, TEXT_ONNX, TOKENIZER_JSON, TORCH_CONFIG, TORCH_WEIGHTS, Bundle, load_bundle
from rsmclip_geo.errors import BundleError, RsmclipError
from rsmclip_geo.pipeline import default_threads
from rsmclip_geo.preprocess import normalize_tiles, prepare_tiles
from rsmclip_geo.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA}
BACKENDS = ("onnx", "torch")
DEFAULT_BATCH_SIZE = 32


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def resolve_providers(providers: Sequence[str] | str | None) -> tuple[list[str], bool]:
    """(onnxruntime provider list, forced?) from user names; None = CUDA if available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None or providers == "auto":
        return ([CUDA, CPU] if CUDA in available else [CPU]), False
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    resolved = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    for provider in resolved:
        if provider not in available:
            raise RsmclipError(f"providers={provider}: not available in this onnxruntime "
                               f"(available: {', '.join(available)}); choose another provider", param="providers",
                               value=provider)
    return resolved, True


class _OnnxTower:
    """ONNX Runtime sessions of one tower, created on first use: one per intra-op thread count.

    A session's `run` is thread-safe; the embedding pipeline calls a single-threaded session from
    several worker threads at once, which keeps every core busy without intra-op synchronisation.
    """

    def __init__(self, bundle: Bundle, filename: str, input_name: str, providers: list[str], forced: bool,
                 threads: int | None) -> None:
        self.path = bundle.file(filename)
        self.embed_dim = bundle.info.embed_dim
        self.precision = bundle.info.precision
        self.input_name = input_name
        self.providers = providers
        self.forced = forced
        self.threads = threads
        self._sessions: dict[int | None, Any] = {}
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        """The session with the tower's own thread setting."""
        return self.session_for(self.threads)

    def session_for(self, threads: int | None) -> Any:
        """The session with `threads` intra-op threads (None: ONNX Runtime's default, all cores)."""
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = self._create(threads)
            return self._sessions[threads]

    @property
    def created(self) -> list[Any]:
        """Sessions created so far."""
        return list(self._sessions.values())

    def _create(self, threads: int | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.precision == "fp16":
            # onnxruntime 1.31's CPU layout optimisations (level ALL) crash on fp16 convolutions
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        quiet = CUDA in self.providers and not self.forced
        if quiet:  # a missing CUDA/cuDNN library is expected on CPU machines: fall back silently
            options.log_severity_level = 4
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{self.path}: cannot be loaded by ONNX Runtime ({reason[:200]}); the file is corrupt "
                              "or not a model, re-export or re-install the bundle") from exc
        finally:
            if quiet:
                ort.set_default_logger_severity(2)
        used = session.get_providers()
        if self.forced and self.providers[0] not in used:
            raise RsmclipError(f"providers={self.providers[0]}: failed to initialise for {self.path.name} "
                               f"(running on {', '.join(used)}); check its libraries or choose the cpu provider",
                               param="providers", value=self.providers[0])
        log.info("%s: running on %s", self.path.name, used[0])
        self._check_io(session)
        return session

    def _check_io(self, session: Any) -> None:
        inputs = [i.name for i in session.get_inputs()]
        if inputs != [self.input_name]:
            raise BundleError(f"{self.path}: expected one input {self.input_name!r}, found {inputs}; re-export the bundle")
        shape = session.get_outputs()[0].shape
        dim = shape[-1] if shape else None
        if len(shape) != 2 or (isinstance(dim, int) and dim != self.embed_dim):
            raise BundleError(f"{self.path}: outputs embeddings of shape {shape} but bundle.json embed_dim is "
                              f"{self.embed_dim}; the towers do not belong together, re-export the bundle")

    @property
    def fixed_length(self) -> int | None:
        """The input's second axis when the graph fixes it (text towers exported at full context length)."""
        shape = self.session.get_inputs()[0].shape
        return shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None

    def run(self, array: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Outputs of the session with `threads` intra-op threads (None: the tower's setting)."""
        session = self.session if threads is None else self.session_for(threads)
        out = session.run(None, {self.input_name: array})[0]
        if out.ndim != 2 or out.shape[1] != self.embed_dim:
            raise BundleError(f"{self.path}: produced shape {out.shape}, bundle.json embed_dim is {self.embed_dim}; "
                              "re-export the bundle")
        return out


class TorchTowers:
    """The bundle's weights.safetensors in open_clip (needs the training extra: torch, open_clip).

    On a CUDA device the towers run in fp16. Tiles go to the device as uint8 from pinned host memory
    (`image_tiles`), each calling thread on its own CUDA stream, so the copies and the inference of
    the pipeline's workers overlap; they are normalised on the device.
    """

    def __init__(self, bundle: Bundle, device: str | None) -> None:
        if not bundle.has_torch_weights:
            raise BundleError(f"{bundle.path}: no {TORCH_WEIGHTS} + {TORCH_CONFIG}; export the bundle with its "
                              "torch weights or use the onnx backend")
        try:
            import torch

            from training.model import create_model
        except ImportError as exc:
            raise RsmclipError("the torch backend needs torch and open_clip (pip install 'rsmclip-geo[train]'); "
                               "or use the onnx backend") from exc
        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        loaded = create_model(bundle.file(TORCH_CONFIG), checkpoint=bundle.file(TORCH_WEIGHTS), device=str(self.device))
        self.model = loaded.model.to(self.dtype).eval()
        info = bundle.info
        self._mean = torch.tensor(info.mean, dtype=self.dtype, device=self.device).view(1, 3, 1, 1) * 255.0
        self._scale = 1.0 / (torch.tensor(info.std, dtype=self.dtype, device=self.device).view(1, 3, 1, 1) * 255.0)
        self._local = threading.local()
        log.info("torch backend on %s (%s)", self.device, str(self.dtype).removeprefix("torch."))

    def _stream(self) -> Any:
        """This thread's CUDA stream (a no-op context on the CPU)."""
        if not self.cuda:
            return contextlib.nullcontext()
        if getattr(self._local, "stream", None) is None:
            self._local.stream = self._torch.cuda.Stream(device=self.device)
        return self._torch.cuda.stream(self._local.stream)

    def _to_device(self, array: np.ndarray) -> Any:
        tensor = self._torch.from_numpy(np.ascontiguousarray(array))
        if self.cuda:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=self.cuda)

    def image(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode(), self._stream():
            tensor = self._to_device(pixels).to(self.dtype)
            return self.model.encode_image(tensor).float().cpu().numpy()

    def image_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 [B,S,S,3] -> image embeddings; scaling and normalisation on the device."""
        with self._torch.inference_mode(), self._stream():
            tensor = self._to_device(tiles).permute(0, 3, 1, 2).to(self.dtype)
            tensor = ((tensor - self._mean) * self._scale).contiguous()
            return self.model.encode_image(tensor).float().cpu().numpy()

    def text(self, ids: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode(), self._stream():
            tensor = self._to_device(ids)
            return self.model.encode_text(tensor).float().cpu().numpy()


class Model:
    """Encode images and texts with one bundle; every output is L2-normalised float32 [B, D]."""

    def __init__(self, bundle: Bundle, *, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 backend: str = "onnx", batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None) -> None:
        if backend not in BACKENDS:
            raise RsmclipError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise RsmclipError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle
        self.info = bundle.info
        self.backend = backend
        self.batch_size = int(batch_size)
        self._tokenizer: TextTokenizer | None = None
        self._torch: TorchTowers | None = None
        if backend == "torch":
            self._torch = TorchTowers(bundle, device)
        else:
            resolved, forced = resolve_providers(providers)
            self._image = _OnnxTower(bundle, IMAGE_ONNX, "pixels", resolved, forced, threads)
            self._text = _OnnxTower(bundle, TEXT_ONNX, "input_ids", resolved, forced, threads)

    @property
    def logit_scale(self) -> float:
        return self.info.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.bundle.file(TOKENIZER_JSON), self.info.context_length,
                                            self.info.pad_id)
        return self._tokenizer

    def encode_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [B,H,W,3] array or list of HxWx3 arrays -> float32 [B,D], L2-normalised."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        count = len(images)
        if count == 0:
            raise RsmclipError("images: no images given")
        parts = [self.encode_tiles(prepare_tiles(images[start:start + self.batch_size], self.info))
                 for start in range(0, count, self.batch_size)]
        return np.concatenate(parts)

    def encode_tiles(self, tiles: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """uint8 [B,S,S,3] tiles at the model's input size (`prepare_tiles`) -> float32 [B,D], L2-normalised.

        One encoder batch: the caller chooses its size (the pipeline's `batch_size` chunks). ONNX
        Runtime gets the tiles normalised on the CPU; the torch backend copies them to its device as
        uint8 (a quarter of the float32 bytes) and normalises them there. `threads` as in `encode_pixels`.
        """
        size = self.info.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (size, size, 3) or tiles.dtype != np.uint8:
            raise RsmclipError(f"tiles: expected uint8 [B,{size},{size},3], got {tiles.dtype} {tiles.shape}")
        if self._torch:
            return l2_normalize(self._torch.image_tiles(tiles))
        return l2_normalize(self._image.run(normalize_tiles(tiles, self.info), threads))

    def encode_pixels(self, pixels: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """Preprocessed float32 [B,3,S,S] -> float32 [B,D], L2-normalised.

        `threads` picks an ONNX Runtime session with that many intra-op threads instead of the
        model's setting (callers that encode from several threads at once pass 1); the torch
        backend ignores it.
        """
        size = self.info.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise RsmclipError(f"pixels: expected float32 [B,3,{size},{size}], got shape {pixels.shape}")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [self._run_image(pixels[start:start + self.batch_size], threads)
                 for start in range(0, pixels.shape[0], self.batch_size)]
        return l2_normalize(np.concatenate(parts))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 [B,D], L2-normalised."""
        ids = self.tokenizer.encode(texts)
        parts = [self._run_text(ids[start:start + self.batch_size]) for start in range(0, ids.shape[0], self.batch_size)]
        return l2_normalize(np.concatenate(parts))

    def encode_token_ids(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids [B,L] (already tokenised) -> float32 [B,D], L2-normalised."""
        return l2_normalize(self._run_text(np.ascontiguousarray(ids, dtype=np.int64)))

    def _run_image(self, pixels: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self._torch.image(pixels) if self._torch else self._image.run(pixels, threads)

    def _run_text(self, ids: np.ndarray) -> np.ndarray:
        if self._torch:
            return self._torch.text(ids)
        length = self._text.fixed_length
        if length is not None and ids.shape[1] < length:
            ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=self.info.pad_id)
        return self._text.run(ids)

    @property
    def torch_towers(self) -> TorchTowers | None:
        """The torch backend's towers (open_clip `model`, `device`, `dtype`); None on ONNX Runtime."""
        return self._torch

    @property
    def providers(self) -> list[str]:
        """Providers of the sessions created so far (the requested ones before any session exists)."""
        if self._torch:
            return [f"torch:{self._torch.device}"]
        for tower in (self._image, self._text):
            if tower.created:
                return list(tower.created[0].get_providers())
        return list(self._image.providers)


def load_model(model: str | os.PathLike | Bundle | None = None, providers: Sequence[str] | str | None = None,
               threads: int | None = None, *, backend: str = "onnx", batch_size: int = DEFAULT_BATCH_SIZE,
               device: str | None = None) -> Model:
    """A Model for a bundle path, a bundle name, a loaded Bundle, or None for the default model."""
    if threads is not None:
        default_threads(threads)  # a clear error for zero or negative counts
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    return Model(bundle, providers=providers, threads=threads, backend=backend, batch_size=batch_size, device=device)


def resolve_model(model: Model | Bundle | str | os.PathLike | None = None, threads: int | None = None) -> Model:
    """A loaded model from None (the default bundle), a name, a path or a Bundle; anything else is taken to
    be a loaded model (a Model, or an object with its methods) and returned as is."""
    if model is None or isinstance(model, (str, os.PathLike, Bundle)):
        return load_model(model, threads=threads)
    return model
