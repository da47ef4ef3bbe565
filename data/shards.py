"""Token shards in the modded-nanogpt / llm.c `.bin` format: a 256 x int32 header, then the tokens.

    header[0] = magic, header[1] = version, header[2] = number of tokens (little-endian int32)
    magic 20240520, version 1: uint16 tokens (modded-nanogpt FineWeb GPT-2 shards load unchanged)
    magic 20240801, version 7: uint32 tokens (llm.c's Llama-3 format; vocabularies above 65,536)

Example (inspect a shard):
    .venv/bin/python -c "from data.shards import open_shard; t = open_shard('data/cache/kjv/val_000000.bin'); \
print(t.dtype, len(t), t[:8])"
"""

import hashlib
import os

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype; the dtype is chosen by write_shard from the largest token id.
FORMATS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}
MAGIC_TO_VERSION = {magic: version for magic, version in FORMATS}


class DataError(ValueError):
    """A missing, truncated or malformed data file; the one-line message names the file and the problem."""


def write_shard(path: str, tokens) -> str:
    """Write `tokens` as one shard, atomically (tmp + os.replace); returns the file's sha256 (hex)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32)):
        raise ValueError(f"{path}: tokens must be a 1-D array of ids in [0, 2**32)")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 count in the header")
    magic, version = (20240801, 7) if tokens.size and tokens.max() >= 2**16 else (20240520, 1)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, tokens.size
    payload = header.tobytes() + tokens.astype(FORMATS[magic, version]).tobytes()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def open_shard(path: str) -> np.ndarray:
    """Validate a shard's header and size, and return its tokens as a read-only np.memmap."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: shard file is missing")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated)")
    magic, version, ntok = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic not in MAGIC_TO_VERSION:
        raise DataError(f"{path}: unknown magic {magic} (expected 20240520 or 20240801; corrupt or not a shard)")
    if version != MAGIC_TO_VERSION[magic]:
        raise DataError(f"{path}: magic {magic} with version {version}, expected {MAGIC_TO_VERSION[magic]}")
    dtype = FORMATS[magic, version]
    expected = HEADER_BYTES + ntok * dtype.itemsize
    if ntok < 0 or size != expected:
        problem = "truncated" if 0 <= ntok and size < expected else "corrupt"
        raise DataError(f"{path}: header says {ntok} tokens ({expected} bytes) but the file is {size} bytes "
                        f"({problem})")
    if ntok == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
