"""The command line's start-up: building the parser (``bitplan --help``) imports none of the
heavy packages, and each command imports only what it uses. Checked in fresh interpreters, as
the ``bitplan`` executable starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "numpy", "solver", "sensitivity", "quantize", "pydantic", "pydantic_settings",
         "fastapi", "starlette", "httpx", "sqlalchemy", "huey", "pulp", "onnx")
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "solver" / "data" / "hawq_v3"


def _loaded_after(code: str) -> set[str]:
    """Top-level packages of HEAVY that ``code`` leaves in sys.modules (fresh interpreter)."""
    probe = (f"import sys\n{code}\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1].replace("'", '"')))


def test_help_imports_no_heavy_package() -> None:
    assert _loaded_after("from service.cli import build_parser; build_parser()") == set()


def test_each_command_imports_only_what_it_uses(tmp_path: Path) -> None:
    out = tmp_path / "sol.json"
    solve = (f"from service.cli import main\n"
             f"assert main(['solve', {str(DATA / 'resnet18_modelsize_0.5.json')!r}, "
             f"'--out', {str(out)!r}]) == 0")
    loaded = _loaded_after(solve)
    assert {"solver", "numpy"} <= loaded  # the solver itself
    assert not loaded & {"torch", "fastapi", "pydantic_settings", "sensitivity", "quantize",
                         "sqlalchemy", "huey"}
    assert json.loads(out.read_text())["status"] == "optimal"


def test_typed_and_command_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "service.cli", "solve",
                              str(tmp_path / "none.json"), "--out", str(tmp_path / "o.json")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2
    assert missing.stderr.startswith("bitplan: error [bad_problem]: cannot read problem file")
    no_service = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--url",
                                 "http://127.0.0.1:9"], capture_output=True, text=True, cwd=ROOT)
    assert no_service.returncode == 2
    assert no_service.stderr.startswith("bitplan: error: no bitplan service at")
    assert "Traceback" not in missing.stderr + no_service.stderr
