"""The calibration file: a ``.safetensors`` header parser that checks names, dtypes, shapes and
sizes before any tensor is read, and the loader that turns the file into a ``CalibrationSet``.

Nothing is unpickled. The ``safetensors`` library checks the header; the tensor bytes (raw
little-endian, as safetensors stores them and every platform torch runs on holds them) are
then read with plain file reads, block by block, straight into the one tensor that keeps each
input: the data is resident once (``load_file`` or a memory map would hold the file's pages
beside the tensors), and finiteness is checked per block. With ``order`` the samples land in
that order, so a train / held-out split is two views of the same tensors
(``quantize.data.split_order``). With ``stream`` the floating-point inputs are read once to
check them (one block at a time) and then left in the file: they are ``quantize.data.FileRows``
whose chunks are read when a stage needs them, so the job does not hold the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantize.data import CalibrationSet, FileRows, OpenFile
from solver.errors import BadCalibrationError, TooLargeError

HOW_TO_CALIBRATE = (
    "Write the calibration file with safetensors: "
    "`safetensors.torch.save_file({'inputs': x, 'labels': y}, 'calib.safetensors')` where x is "
    "[N, ...] (N >= 2 samples; float, or integer/bool where the model's input is, e.g. token "
    "ids) and y (optional) is int64 [N] (or [N, T] per-token targets, -100 = ignored); a model "
    "with several inputs uses one 'input.<argument name>' tensor per forward argument instead "
    "of 'inputs'."
)

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
INPUT_DTYPES = {*FLOAT_DTYPES, *INT_DTYPES, "BOOL"}  # model inputs: float, ids, masks
IGNORE_INDEX = -100  # a per-token label that is not scored (the Hugging Face convention)
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPES = {**FLOAT_DTYPES, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                 "I64": torch.int64, "U8": torch.uint8, "U16": torch.uint16,
                 "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class ReadParams:
    """Tuning constants of the calibration reader."""

    block_bytes: int = 16 * 2**20  # one read (and one finiteness check) at a time: a few
    # hundred 224x224 images, a small fixed cost beside the data it fills


READ_PARAMS = ReadParams()


def read_header(path: Path) -> dict[str, Any]:
    """The header of a ``.safetensors`` file as ``{tensor name: {dtype, shape, data_offsets}}``
    (metadata dropped), each entry checked against the file's size.

    Raises:
        BadCalibrationError: not a safetensors file, or a header that does not match the data.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadCalibrationError(f"{path.name!r} is too short to be .safetensors. "
                                      + HOW_TO_CALIBRATE)
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise BadCalibrationError(
                f"{path.name!r} is not a .safetensors file (bad header length). "
                + HOW_TO_CALIBRATE
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadCalibrationError(
                f"{path.name!r} is not a .safetensors file (unreadable header). "
                + HOW_TO_CALIBRATE
            ) from None
    if not isinstance(header, dict):
        raise BadCalibrationError(f"{path.name!r} has a malformed header. " + HOW_TO_CALIBRATE)
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise BadCalibrationError(
                f"tensor {name!r}: malformed header entry. " + HOW_TO_CALIBRATE
            ) from None
        nbytes = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if dtype not in _DTYPE_BYTES or end - start != nbytes or not 0 <= start <= end <= data_size:
            raise BadCalibrationError(
                f"tensor {name!r}: header does not match the data (dtype {dtype}, shape {shape}); "
                f"the file is truncated or corrupted. " + HOW_TO_CALIBRATE
            )
    return header


def count_samples(path: str | Path, max_bytes: int | None = None) -> int:
    """N, the calibration file's number of samples, from its header (checked as
    :func:`load_calibration` checks it; no tensor is read)."""
    return _checked_header(Path(path), max_bytes)[2]


def _checked_header(path: Path, max_bytes: int | None) -> tuple[dict[str, Any], list[str], int]:
    """(header, the ``input.<name>`` tensors, N): names, dtypes, shapes and sizes checked."""
    if not path.is_file():
        raise BadCalibrationError(f"calibration file {path.name!r} does not exist. "
                                  + HOW_TO_CALIBRATE)
    header = read_header(path)
    total = sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0]) for e in header.values())
    if max_bytes is not None and total > max_bytes:
        raise TooLargeError(
            f"calibration tensors take {total} bytes, more than the limit of {max_bytes}; "
            "send fewer samples (a few hundred are enough)."
        )
    names = set(header)
    keyword = sorted(n for n in names if n.startswith("input."))
    unknown = sorted(names - {"inputs", "labels"} - set(keyword))
    if unknown:
        raise BadCalibrationError(
            f"unexpected tensor(s) {unknown}: only 'inputs', 'input.<name>' and 'labels' are "
            "read. " + HOW_TO_CALIBRATE
        )
    if "inputs" in names and keyword:
        raise BadCalibrationError(
            "the file has both 'inputs' and 'input.<name>' tensors; use one or the other. "
            + HOW_TO_CALIBRATE
        )
    if "inputs" not in names and not keyword:
        raise BadCalibrationError("the file has no 'inputs' tensor. " + HOW_TO_CALIBRATE)
    for name in ["inputs", *keyword]:
        if name in header and header[name]["dtype"] not in INPUT_DTYPES:
            raise BadCalibrationError(
                f"tensor {name!r} has dtype {header[name]['dtype']}; model inputs must be "
                "floating point, integer or bool, as the model's input is. " + HOW_TO_CALIBRATE
            )
        if name in header and len(header[name]["shape"]) < 1:
            raise BadCalibrationError(
                f"tensor {name!r} is a scalar; it needs a leading sample dimension [N, ...]."
            )
    if "labels" in header:
        lab = header["labels"]
        if lab["dtype"] not in INT_DTYPES or len(lab["shape"]) not in (1, 2):
            raise BadCalibrationError(
                f"tensor 'labels' has dtype {lab['dtype']} and shape {lab['shape']}; it must be "
                "int64 class indices of shape [N] (or per-token targets [N, T]). "
                + HOW_TO_CALIBRATE
            )
    counts = {name: int(e["shape"][0]) for name, e in header.items()}
    if len(set(counts.values())) != 1:
        raise BadCalibrationError(
            f"tensors disagree on the number of samples {counts}; every tensor's first "
            "dimension is the sample index and must be the same N."
        )
    n = next(iter(counts.values()))
    if n < 2:
        raise BadCalibrationError(
            f"the calibration set has {n} sample(s); send at least 2 (a few hundred is typical)."
        )
    return header, keyword, n


def load_calibration(path: str | Path, max_bytes: int | None = None,
                     order: torch.Tensor | None = None, stream: bool = False) -> CalibrationSet:
    """Read and validate a calibration ``.safetensors`` file.

    Tensors: ``inputs`` (one positional model input, [N, ...]) or ``input.<name>`` (one per
    forward argument), optional ``labels`` (integer [N] class indices, or [N, T] per-token targets
    where ``IGNORE_INDEX`` is not scored; returned as int64). Inputs are floating point (and
    finite), integer or bool; whether each fits the model's input is checked by
    ``inputs.bind_inputs``. All tensors share N >= 2. ``max_bytes`` bounds the tensor data,
    checked from the header before anything is loaded. ``order`` (a permutation of N): sample
    i of the result is the file's sample ``order[i]`` (read in place, no second copy).
    ``stream``: each floating-point input is checked, then returned as a ``FileRows`` of the
    file (read on demand; labels and integer inputs are read into memory as usual).

    Raises:
        BadCalibrationError: naming the tensor and what to fix.
        TooLargeError: the tensors exceed ``max_bytes``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header, keyword, n = _checked_header(path, max_bytes)
    if order is not None and (order.shape != (n,) or not torch.equal(
            order.sort().values, torch.arange(n))):
        raise ValueError(f"order must be a permutation of the {n} samples")
    try:
        with safe_open(str(path), framework="pt"):  # the library's own header checks
            pass
        tensors = _read_tensors(path, header, order, OpenFile(path) if stream else None)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadCalibrationError(
            f"could not read {path.name!r} ({str(exc)[:200]}). " + HOW_TO_CALIBRATE
        ) from None
    labels = tensors.get("labels")
    if labels is not None:
        labels = labels.to(torch.int64)
        lowest = IGNORE_INDEX if labels.dim() == 2 else 0
        if int(labels.min()) < 0 and not bool(((labels >= 0) | (labels == lowest)).all()):
            raise BadCalibrationError(
                "tensor 'labels' has negative values; use class indices"
                + (f" ({IGNORE_INDEX} marks a token that is not scored)." if lowest else ".")
            )
        if bool((labels == IGNORE_INDEX).all()):
            raise BadCalibrationError(f"every label is {IGNORE_INDEX} (ignored); nothing to score.")
    if "inputs" in tensors:
        return CalibrationSet((tensors["inputs"],), {}, labels)
    return CalibrationSet((), {k[len("input."):]: tensors[k] for k in keyword}, labels)


def _read_tensors(path: Path, header: dict[str, Any], order: torch.Tensor | None,
                  source: OpenFile | None = None) -> dict[str, torch.Tensor | FileRows]:
    """Every tensor of the file (``order``: samples permuted), read block by block into its
    one tensor; a float tensor with NaN/Inf raises BadCalibrationError naming the count. With
    ``source`` (the file, open), a floating-point input is checked block by block through one
    buffer and returned as ``FileRows`` of ``source``."""
    params = READ_PARAMS
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        base = 8 + header_len
        where = None if order is None else torch.empty_like(order).index_put_(
            (order,), torch.arange(len(order)))  # file sample i -> its row in the result
        out: dict[str, torch.Tensor | FileRows] = {}
        for name, entry in header.items():
            shape = [int(d) for d in entry["shape"]]
            dtype = _TORCH_DTYPES[entry["dtype"]]
            streamed = source is not None and name != "labels" and dtype.is_floating_point
            # (a streamed input keeps no rows: its tensor only gives the element size)
            t = torch.empty([0, *shape[1:]] if streamed else shape, dtype=dtype)
            out[name] = t if not streamed else FileRows(
                source, base + int(entry["data_offsets"][0]), shape[1:], dtype,
                torch.arange(shape[0]) if order is None else order)
            if math.prod(shape) == 0:
                continue
            rows = shape[0]
            row_bytes = math.prod(shape[1:]) * t.element_size()
            step = max(1, params.block_bytes // max(row_bytes, 1))
            buf = None if where is None and not streamed else torch.empty(
                [min(step, rows), *shape[1:]], dtype=dtype)
            f.seek(base + int(entry["data_offsets"][0]))
            bad = 0
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                block = t[r0:r1] if buf is None else buf[: r1 - r0]
                _fill(f, block, name)
                if block.is_floating_point():
                    bad += int((~torch.isfinite(block)).sum())
                if buf is not None and not streamed:
                    t.index_copy_(0, where[r0:r1], block)
            if bad:
                raise BadCalibrationError(
                    f"tensor {name!r} has {bad} NaN/Inf value(s); remove or replace those "
                    "samples."
                )
    return out


def _fill(f: Any, block: torch.Tensor, name: str) -> None:
    """Read ``block``'s bytes (a contiguous tensor) from ``f``'s position."""
    view = memoryview(block.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise BadCalibrationError(f"tensor {name!r}: the file ends inside its data (it "
                                      "is truncated). " + HOW_TO_CALIBRATE)
        done += got
