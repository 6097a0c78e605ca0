"""Streaming the ``POST /plan`` multipart body to disk, refusing it as soon as it is too large.

FastAPI's ``UploadFile`` parameters would spool the whole body before the route runs, so an
oversize upload would fill the disk first. Here the body is parsed chunk by chunk
(python-multipart) while counting bytes. Each file part has its own limit (``limits``, from
``BITPLAN_MAX_<PART>_MB``): a part that grows past it is refused at the chunk that crosses it,
before that chunk is written, with a message naming the part and the setting; nothing more is
read and the caller deletes the partial files. A declared ``Content-Length`` above what the
parts may hold together (or above ``max_total``) is refused before reading anything.

File parts are written to fixed names inside the job's directory; the client's file name is
kept only as metadata, never used as a path.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from solver.errors import BitplanError, TooLargeError


class BadRequestError(BitplanError):
    """The request body is not the expected multipart form."""

    code = "bad_request"


@dataclass(frozen=True)
class FilePart:
    """A file field of the form: the fixed name it is written to, and whether it must be sent.
    Its size limit is the setting ``BITPLAN_MAX_<NAME>_MB`` (``limit_setting``)."""

    filename: str
    required: bool = True


FILE_PARTS: dict[str, FilePart] = {
    "model": FilePart("model.pt2"),
    "calibration": FilePart("calibration.safetensors"),
    # used only to evaluate the plan (the worker finds it beside the calibration file)
    "evaluation": FilePart("evaluation.safetensors", required=False),
}
FIELD_PARTS = {"constraints"}
MAX_FIELD_BYTES = 1_000_000  # a constraints document is small; a latency table at most a few kB
FORM_OVERHEAD_BYTES = 64_000  # part headers and boundaries, beyond the parts' own bytes


def limit_setting(part: str) -> str:
    """The environment variable that bounds file part ``part``."""
    return f"BITPLAN_MAX_{part.upper()}_MB"


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


def _part_too_large(part: str, limit: int) -> TooLargeError:
    setting = limit_setting(part)
    return TooLargeError(
        f"the {part} part is larger than its limit of {_mb(limit)}; raise {setting} "
        "(MB = 1e6 bytes) on the server to accept it",
        detail={"part": part, "limit_bytes": limit, "setting": setting},
    )


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

    def __init__(self, dest: Path, limits: Mapping[str, int]) -> None:
        self.dest = dest
        self.limits = limits
        self.result = PlanUpload()
        self._written = 0
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
        self._written = 0

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
            raise BadRequestError(f"unexpected form field {name!r}: send {_form_fields()}")
        if name in self.result.files or name in self.result.fields:
            raise BadRequestError(f"form field {name!r} was sent twice")
        self._part = name
        if name in FILE_PARTS:
            path = self.dest / FILE_PARTS[name].filename
            self._file = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / close_all
            self.open_files.append(self._file)
            self.result.files[name] = path
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.result.filenames[name] = _safe_name(filename) or FILE_PARTS[name].filename

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._written += end - start
            part = str(self._part)
            limit = self.limits.get(part, 0)
            if self._written > limit:  # refused before this data is written
                raise _part_too_large(part, limit)
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


def _form_fields() -> str:
    files = [n if p.required else f"optionally {n}" for n, p in FILE_PARTS.items()]
    return ", ".join([*files, *sorted(FIELD_PARTS)])


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequestError(f"POST /plan takes multipart/form-data with fields {_form_fields()}")
    return options[b"boundary"]


def body_limit(limits: Mapping[str, int], max_total: int | None = None) -> int:
    """The most bytes a ``POST /plan`` body may have: what its parts may hold together plus
    the form's own overhead, or ``max_total`` when that is smaller."""
    parts = sum(limits.get(n, 0) for n in FILE_PARTS)
    bound = parts + MAX_FIELD_BYTES * len(FIELD_PARTS) + FORM_OVERHEAD_BYTES
    return bound if max_total is None else min(bound, max_total)


async def receive_plan_upload(
    content_type: str | None,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    dest: Path,
    limits: Mapping[str, int],
    max_total: int | None = None,
) -> PlanUpload:
    """Parse the multipart ``stream`` into ``dest`` (which must exist).

    ``limits`` maps each file part to its most bytes; ``max_total`` optionally bounds the whole
    body (BITPLAN_MAX_UPLOAD_MB). Raises TooLargeError (naming the part and its setting) once a
    part grows past its limit, or when the body is (or is announced) larger than allowed, and
    BadRequestError for a malformed form or a missing part.
    """
    most = body_limit(limits, max_total)
    if max_total is not None and most == max_total:
        limit_text = f"{_mb(most)} (BITPLAN_MAX_UPLOAD_MB)"
    else:
        limit_text = f"{_mb(most)}, what the parts may hold together (" + ", ".join(
            f"{n} {_mb(limits.get(n, 0))}, {limit_setting(n)}" for n in FILE_PARTS) + ")"
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise BadRequestError("Content-Length is not a number") from None
        if declared > most:
            raise TooLargeError(f"the upload is {declared / 1e6:.1f} MB, the limit is {limit_text}")
    boundary = _boundary(content_type)
    collector = _Collector(dest, limits)
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
            if total > most:
                raise TooLargeError(f"the upload exceeds the limit of {limit_text}")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from None
    finally:
        collector.close_all()
    result = collector.result
    result.total_bytes = total
    required = [n for n, p in FILE_PARTS.items() if p.required] + sorted(FIELD_PARTS)
    missing = [n for n in required if n not in result.files | result.fields]
    if missing:
        raise BadRequestError(
            f"missing form field(s): {', '.join(missing)} (POST /plan needs a model .pt2 file, "
            "a calibration .safetensors file and a constraints JSON string)"
        )
    return result
