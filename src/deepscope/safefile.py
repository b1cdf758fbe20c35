"""Files that cannot run code when they are opened: nested state as safetensors, written atomically.

Checkpoints and classifiers travel inside the folders people share, so opening one must never execute anything.
A pickle (and ``torch.save``'s zip of pickles) can; a safetensors file cannot: it is raw tensors behind a JSON header.
A nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) is stored as its tensors, each under
the path that leads to it (``model/conv.weight``, ``optimizer/state/0/momentum_buffer``), plus a JSON skeleton of
everything else in the header's metadata. Reading rebuilds the same nested state (tuples stay tuples, integer keys
stay integers, floats are exact), so a resumed run continues bit for bit.

Written here because safetensors stores only a flat mapping of tensors and string metadata, while a training state
(optimizer state keyed by integers, RNG tuples, history) is nested.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from deepscope.atomic import atomic_write

STATE_KEY = "deepscope_state"  # metadata entry holding the JSON skeleton
FORMAT_KEY = "format"  # metadata entry naming what the file holds (a checkpoint, a pixel classifier)
TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
TAGS = frozenset({TENSOR, ARRAY, TUPLE, ITEMS})
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of ``value``; its tensors and arrays go into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor | np.ndarray):
        key = path.strip("/") or "tensor"
        while key in tensors:  # a dict key holding "/" could name the same path twice
            key += "'"
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
            return {TENSOR: key}
        if value.dtype.hasobject:
            raise TypeError(f"{path}: an array of Python objects cannot be stored")
        tensors[key] = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True))
        return {ARRAY: key}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not TAGS & value.keys():
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        if not all(k is None or isinstance(k, str | int | float) for k in value):
            raise TypeError(f"{path or 'state'}: a mapping's keys must be strings or numbers")
        return {ITEMS: [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(
        f"{path or 'state'}: a {type(value).__name__} cannot be stored (only tensors, arrays and plain values)"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state of a JSON skeleton; ``ValueError`` for anything that does not belong there."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = TAGS & value.keys()
    if not tag:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if len(value) != 1:
        raise ValueError(f"a tagged entry holds other keys too ({', '.join(sorted(value))[:80]})")
    (name,) = tag
    inner = value[name]
    if name in (TENSOR, ARRAY):
        if not isinstance(inner, str) or inner not in tensors:
            raise ValueError(f"it refers to a tensor the file does not hold ({str(inner)[:80]!r})")
        return tensors[inner] if name == TENSOR else tensors[inner].numpy()
    if not isinstance(inner, list):
        raise ValueError(f"{name} holds a {type(inner).__name__}, not a list")
    if name == TUPLE:
        return tuple(_decode(v, tensors) for v in inner)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
        raise ValueError("a mapping's items are not key-value pairs")
    if not all(k is None or isinstance(k, str | int | float) for k, _ in inner):
        raise ValueError("a mapping has a key that is not a plain value")
    return {k: _decode(v, tensors) for k, v in inner}


def state_bytes(state: Any, fmt: str, summary: dict[str, str] | None = None) -> bytes:
    """``state`` as a safetensors file whose metadata names its ``fmt`` and holds ``summary`` (strings a listing may
    read without loading the tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "", tensors)
    metadata = {**(summary or {}), FORMAT_KEY: fmt, STATE_KEY: json.dumps(skeleton)}
    return safetensors_bytes(tensors, metadata=metadata)


def write_state(path: Path, state: Any, fmt: str, what: str, summary: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`state_bytes`); ``what`` names the file in errors."""
    data = state_bytes(state, fmt, summary)
    atomic_write(path, lambda handle: handle.write(data), what)


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: a little-endian header length, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER and head[8:] == b"{"


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The string metadata of a safetensors file and (unless ``tensors`` is False: a listing reads the header only)
    its tensors, on the CPU; ``ValueError`` if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}  # noqa: SIM118 (not a mapping)
            return dict(handle.metadata() or {}), found
    except Exception as exc:  # safetensors raises its own error type, or OSError, for damaged or truncated files
        raise ValueError(f"a damaged safetensors file ({str(exc).splitlines()[0][:120]})") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors; ``ValueError`` if it is damaged."""
    return read_safetensors(path, tensors=False)[0]


def decode_state(metadata: dict[str, str], tensors: dict[str, torch.Tensor], fmt: str) -> Any:
    """The nested state a file of format ``fmt`` holds (see :func:`read_safetensors`); ``ValueError`` saying what is
    wrong."""
    if metadata.get(FORMAT_KEY) != fmt or STATE_KEY not in metadata:
        raise ValueError(f"not a {fmt} file (its header says {metadata.get(FORMAT_KEY)!r})")
    try:
        skeleton = json.loads(metadata[STATE_KEY])
    except (ValueError, RecursionError):
        raise ValueError("its header's state is not valid JSON") from None
    try:
        return _decode(skeleton, tensors)
    except RecursionError:
        raise ValueError("its state is nested too deeply") from None


def read_state(path: Path, fmt: str) -> Any:
    """The nested state written by :func:`write_state` with format ``fmt``; ``ValueError`` saying what is wrong."""
    return decode_state(*read_safetensors(path), fmt)
