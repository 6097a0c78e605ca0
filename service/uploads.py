"""Streaming the ``POST /plan`` multipart body to disk, refusing it as soon as it is too large.

FastAPI's ``UploadFile`` parameters would spool the whole body before the route runs, so an
oversize upload would fill the disk first. Here the body is parsed chunk by chunk
(python-multipart) while counting bytes: a declared ``Content-Length`` above the limit is
refused before reading anything, and a body that grows past the limit is refused at the chunk
that crosses it (nothing more is read, the partial files are deleted by the caller).

File parts are written to fixed names inside the job's directory; the client's file name is
kept only as metadata, never used as a path.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from solver.errors import BitplanError, TooLargeError


class BadRequestError(BitplanError):
    """The request body is not the expected multipart form."""

    code = "bad_request"


FILE_PARTS = {"model": "model.pt2", "calibration": "calibration.safetensors"}
FIELD_PARTS = {"constraints"}
MAX_FIELD_BYTES = 1_000_000  # a constraints document is small; a latency table at most a few kB


@dataclass
class PlanUpload:
    """What ``receive_plan_upload`` wrote: the file paths, the text fields, original names."""

    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0


def _safe_name(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100]


class _Collector:
    """python-multipart callbacks -> files on disk and small text fields."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.result = PlanUpload()
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._part: str | None = None
        self._file: BinaryIO | None = None
        self._field = bytearray()
        self.open_files: list[BinaryIO] = []

    def on_part_begin(self) -> None:
        self._headers, self._part, self._file = {}, None, None
        self._field = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise BadRequestError("every multipart part needs Content-Disposition: form-data")
        name = options[b"name"].decode("utf-8", "replace")
        if name not in FILE_PARTS and name not in FIELD_PARTS:
            raise BadRequestError(
                f"unexpected form field {name!r}: send model, calibration and constraints"
            )
        if name in self.result.files or name in self.result.fields:
            raise BadRequestError(f"form field {name!r} was sent twice")
        self._part = name
        if name in FILE_PARTS:
            path = self.dest / FILE_PARTS[name]
            self._file = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / close_all
            self.open_files.append(self._file)
            self.result.files[name] = path
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.result.filenames[name] = _safe_name(filename) or FILE_PARTS[name]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self._field += data[start:end]
        if len(self._field) > MAX_FIELD_BYTES:
            raise TooLargeError(f"form field {self._part!r} exceeds {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._part is not None:
            try:
                self.result.fields[self._part] = self._field.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(f"form field {self._part!r} is not UTF-8 text") from None

    def close_all(self) -> None:
        for f in self.open_files:
            f.close()


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequestError(
            "POST /plan takes multipart/form-data with fields model, calibration, constraints"
        )
    return options[b"boundary"]


async def receive_plan_upload(
    content_type: str | None,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    dest: Path,
    max_bytes: int,
) -> PlanUpload:
    """Parse the multipart ``stream`` into ``dest`` (which must exist).

    Raises TooLargeError once more than ``max_bytes`` arrive (or are announced), and
    BadRequestError for a malformed form or a missing part.
    """
    limit_text = f"{max_bytes / 1e6:g} MB (BITPLAN_MAX_UPLOAD_MB)"
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise BadRequestError("Content-Length is not a number") from None
        if declared > max_bytes:
            raise TooLargeError(f"the upload is {declared / 1e6:.1f} MB, the limit is {limit_text}")
    boundary = _boundary(content_type)
    collector = _Collector(dest)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    total = 0
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise TooLargeError(f"the upload exceeds the limit of {limit_text}")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from None
    finally:
        collector.close_all()
    result = collector.result
    result.total_bytes = total
    missing = [n for n in (*FILE_PARTS, *FIELD_PARTS) if n not in result.files | result.fields]
    if missing:
        raise BadRequestError(
            f"missing form field(s): {', '.join(missing)} (POST /plan needs a model .pt2 file, "
            "a calibration .safetensors file and a constraints JSON string)"
        )
    return result
