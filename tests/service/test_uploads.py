"""Streaming multipart parsing with a limit per part: a part stops being read at the chunk that
crosses its limit, and the 413 names the part and the setting that bounds it (also through the
app, with real multipart bodies)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from svc_helpers import constraints, post_plan

from service import uploads
from service.app import create_app
from service.settings import Settings
from service.uploads import BadRequestError, FilePart, body_limit, receive_plan_upload
from solver.errors import TooLargeError

BIG = {"model": 10**6, "calibration": 10**6, "evaluation": 10**6}


def _body(model: bytes, calib: bytes, constraints: str = "{}",
          **extra: bytes) -> tuple[str, bytes]:
    files = {"model": ("../../evil.pt2", model), "calibration": ("c.safetensors", calib)}
    files.update({name: (f"{name}.bin", data) for name, data in extra.items()})
    request = httpx.Request("POST", "http://x/plan", files=files,
                            data={"constraints": constraints})
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


def _receive(content_type, length, stream, dest, limits=BIG, max_total=None):
    return asyncio.run(receive_plan_upload(content_type, length, stream, dest, limits, max_total))


def test_parts_land_in_fixed_files(tmp_path: Path) -> None:
    model, calib = b"PK" + bytes(range(256)) * 40, b"\x08" * 5000
    ctype, body = _body(model, calib, '{"limits": {"size_mb": 1}}')
    up = _receive(ctype, str(len(body)), Chunks(body, 777), tmp_path)
    assert up.files["model"] == tmp_path / "model.pt2"  # the client's name is not a path
    assert up.files["model"].read_bytes() == model
    assert up.files["calibration"].read_bytes() == calib
    assert up.fields["constraints"] == '{"limits": {"size_mb": 1}}'
    assert up.filenames["model"] == "evil.pt2"
    assert up.total_bytes == len(body)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors", "model.pt2"]


@pytest.mark.parametrize("part", ["model", "calibration"])
def test_a_part_at_its_limit_passes_and_one_byte_more_is_refused(tmp_path: Path,
                                                                 part: str) -> None:
    limits = {**BIG, part: 3000}
    sizes = {"model": 10, "calibration": 10}
    for n, ok in ((3000, True), (3001, False)):
        sizes[part] = n
        dest = tmp_path / str(n)
        dest.mkdir()
        ctype, body = _body(b"m" * sizes["model"], b"c" * sizes["calibration"])
        if ok:
            up = _receive(ctype, str(len(body)), Chunks(body, 512), dest, limits)
            assert up.files[part].stat().st_size == 3000
        else:
            with pytest.raises(TooLargeError) as info:
                _receive(ctype, str(len(body)), Chunks(body, 512), dest, limits)
            assert info.value.detail == {"part": part, "limit_bytes": 3000,
                                         "setting": f"BITPLAN_MAX_{part.upper()}_MB"}
            assert (dest / uploads.FILE_PARTS[part].filename).stat().st_size <= 3000


def test_streamed_part_over_its_limit_stops_reading(tmp_path: Path) -> None:
    ctype, body = _body(b"\0" * 200_000, b"\1" * 10)
    stream = Chunks(body, 10_000)
    with pytest.raises(TooLargeError, match="the model part .* BITPLAN_MAX_MODEL_MB"):
        _receive(ctype, None, stream, tmp_path, {**BIG, "model": 50_000})  # chunked upload
    assert stream.read == 6  # 60 kB read of ~200 kB: refused at the chunk that crossed 50 kB
    assert (tmp_path / "model.pt2").stat().st_size <= 50_000


def test_declared_length_over_the_limit_reads_nothing(tmp_path: Path) -> None:
    ctype, body = _body(b"\0" * 1000, b"")
    stream = Chunks(body, 100)
    with pytest.raises(TooLargeError, match="BITPLAN_MAX_MODEL_MB.*BITPLAN_MAX_CALIBRATION_MB"):
        _receive(ctype, str(10**9), stream, tmp_path)
    assert stream.read == 0 and list(tmp_path.iterdir()) == []
    with pytest.raises(TooLargeError, match="BITPLAN_MAX_UPLOAD_MB"):
        _receive(ctype, str(len(body)), stream, tmp_path, max_total=len(body) - 1)
    assert stream.read == 0


def test_the_body_limit_is_the_parts_together() -> None:
    limits = {"model": 7_000_000, "calibration": 3_000_000, "evaluation": 2_000_000}
    parts = sum(limits[n] for n in uploads.FILE_PARTS)  # the parts the form has
    assert parts <= body_limit(limits) <= parts + 2_000_000
    assert body_limit(limits, max_total=1000) == 1000


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
        _receive(ctype, str(len(body)), Chunks(body, 7), tmp_path)


# Through the app: real multipart bodies, the 413's body, nothing left on disk. ---------------


@pytest.fixture(scope="module")
def good(mlp_pt2: Path, calib_path: Path) -> tuple[bytes, bytes]:
    return mlp_pt2.read_bytes(), calib_path.read_bytes()


def _post(settings: Settings, model: bytes, calib: bytes, **extra: bytes) -> httpx.Response:
    with TestClient(create_app(settings)) as c:
        if not extra:
            return post_plan(c, model, calib, constraints())
        files = {"model": ("m.pt2", model), "calibration": ("c.safetensors", calib)}
        files.update({name: (f"{name}.safetensors", data) for name, data in extra.items()})
        return c.post("/plan", files=files, data={"constraints": constraints()})


@pytest.mark.parametrize("part", ["model", "calibration"])
def test_app_answers_413_naming_the_part_and_setting(tmp_path: Path, good, part: str) -> None:
    limit_mb = 0.05
    settings = Settings(data_dir=tmp_path, **{f"max_{part}_mb": limit_mb})
    model, calib = good
    big = b"\0" * 60_000
    r = _post(settings, big if part == "model" else model, big if part == "calibration" else calib)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "too_large"
    assert f"the {part} part" in err["message"]
    assert f"BITPLAN_MAX_{part.upper()}_MB" in err["message"] and "0.05 MB" in err["message"]
    assert err["detail"]["part"] == part
    assert list((tmp_path / "jobs").iterdir()) == []  # the partial upload is gone
    with TestClient(create_app(settings)) as c:
        assert c.get("/jobs").json()["total"] == 0


def test_app_accepts_parts_under_their_own_limits(tmp_path: Path, good) -> None:
    model, calib = good
    # each part fits its own limit while the two together exceed either limit
    settings = Settings(data_dir=tmp_path, max_model_mb=len(model) / 1e6 + 0.001,
                        max_calibration_mb=len(calib) / 1e6 + 0.001)
    assert len(model) + len(calib) > max(settings.upload_limits["model"],
                                         settings.upload_limits["calibration"])
    assert _post(settings, model, calib).status_code == 202


def test_app_answers_413_for_the_evaluation_part(tmp_path: Path, good,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The optional evaluation part (as POST /plan lists it) has its own limit and setting."""
    monkeypatch.setitem(uploads.FILE_PARTS, "evaluation",
                        uploads.FILE_PARTS.get("evaluation")
                        or FilePart("evaluation.safetensors", required=False))
    settings = Settings(data_dir=tmp_path, max_evaluation_mb=0.01)
    r = _post(settings, *good, evaluation=b"\0" * 20_000)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert "the evaluation part" in err["message"]
    assert "BITPLAN_MAX_EVALUATION_MB" in err["message"]
    assert list((tmp_path / "jobs").iterdir()) == []


def test_app_whole_body_cap(tmp_path: Path, good) -> None:
    settings = Settings(data_dir=tmp_path, max_upload_mb=0.05)
    r = _post(settings, b"\0" * 60_000, good[1])
    assert r.status_code == 413
    assert "BITPLAN_MAX_UPLOAD_MB" in r.json()["error"]["message"]
    assert list((tmp_path / "jobs").iterdir()) == []
