"""Streaming multipart parsing: the size limit stops reading at the chunk that crosses it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.uploads import BadRequestError, receive_plan_upload
from solver.errors import TooLargeError


def _body(model: bytes, calib: bytes, constraints: str = "{}") -> tuple[str, bytes]:
    request = httpx.Request(
        "POST",
        "http://x/plan",
        files={"model": ("../../evil.pt2", model), "calibration": ("c.safetensors", calib)},
        data={"constraints": constraints},
    )
    return request.headers["content-type"], request.read()


class Chunks:
    """An async body stream that counts how much of it was read."""

    def __init__(self, body: bytes, size: int) -> None:
        self.parts = [body[i : i + size] for i in range(0, len(body), size)]
        self.read = 0

    async def __aiter__(self):
        for part in self.parts:
            self.read += 1
            yield part


def _receive(content_type, length, stream, dest, limit):
    return asyncio.run(receive_plan_upload(content_type, length, stream, dest, limit))


def test_parts_land_in_fixed_files(tmp_path: Path) -> None:
    model, calib = b"PK" + bytes(range(256)) * 40, b"\x08" * 5000
    ctype, body = _body(model, calib, '{"limits": {"size_mb": 1}}')
    up = _receive(ctype, str(len(body)), Chunks(body, 777), tmp_path, 10**6)
    assert up.files["model"] == tmp_path / "model.pt2"  # the client's name is not a path
    assert up.files["model"].read_bytes() == model
    assert up.files["calibration"].read_bytes() == calib
    assert up.fields["constraints"] == '{"limits": {"size_mb": 1}}'
    assert up.filenames["model"] == "evil.pt2"
    assert up.total_bytes == len(body)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors", "model.pt2"]


def test_streamed_body_over_the_limit_stops_reading(tmp_path: Path) -> None:
    ctype, body = _body(b"\0" * 200_000, b"\1" * 10)
    stream = Chunks(body, 10_000)
    with pytest.raises(TooLargeError, match="BITPLAN_MAX_UPLOAD_MB"):
        _receive(ctype, None, stream, tmp_path, 50_000)  # chunked: no Content-Length
    assert stream.read == 6  # 60 kB read of ~200 kB: refused at the chunk that crossed 50 kB
    assert (tmp_path / "model.pt2").stat().st_size <= 50_000


def test_declared_length_over_the_limit_reads_nothing(tmp_path: Path) -> None:
    ctype, body = _body(b"\0" * 1000, b"")
    stream = Chunks(body, 100)
    with pytest.raises(TooLargeError):
        _receive(ctype, str(10**9), stream, tmp_path, 10**6)
    assert stream.read == 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "ctype,body,match",
    [
        ("application/json", b"{}", "multipart/form-data"),
        ("multipart/form-data", b"x", "multipart/form-data"),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; "
         b'name="colour"\r\n\r\nred\r\n--zz--\r\n', "unexpected form field"),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; "
         b'name="constraints"\r\n\r\n{}\r\n--zz--\r\n', "missing form field"),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; "
         b'name="constraints"\r\n\r\n\xff\xfe\r\n--zz--\r\n', "not UTF-8"),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: attachment; "
         b'name="model"\r\n\r\n1\r\n--zz--\r\n', "form-data"),
    ],
)
def test_malformed_bodies(tmp_path: Path, ctype: str, body: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        _receive(ctype, str(len(body)), Chunks(body, 7), tmp_path, 10**6)
