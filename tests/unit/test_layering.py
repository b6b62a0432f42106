"""The import floors: schemas < kiln (SDK, Core API) and services < the CLI's operator commands and deploy.

Training code and the client SDK import nothing from ``services/`` or the server libraries, and the CLI
loads the operator machinery only inside the commands that need it. Structural checks, no timings (the
timings are in benchmarks/startup).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_LIBS = ("litestar", "asyncpg", "nats", "uvicorn", "minio", "structlog", "argon2")


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("statement", [
    "import kiln",
    "import kiln.core",
    "import kiln.client",
    "import kiln.models",
    "import kiln as det; det.core.get_cluster_info",
    "from kiln import InvalidHP, LOG_FORMAT, get_cluster_info",
])
def test_training_code_and_the_sdk_load_no_service_and_no_server_library(statement: str) -> None:
    roots = _roots(_loaded_after(statement))
    assert not roots & {"services", "deploy"}, statement
    assert not roots & set(SERVER_LIBS), statement


def test_the_cli_loads_neither_the_operator_machinery_nor_httpx_nor_the_core_api_until_a_command_runs() -> None:
    loaded = _loaded_after("import kiln.cli")
    assert not _roots(loaded) & {"services", "deploy", "httpx", *SERVER_LIBS}
    assert "kiln.core" not in loaded


def test_the_lazy_core_api_names_are_the_real_ones() -> None:
    import kiln
    import kiln._info
    import kiln.core

    assert kiln.core is sys.modules["kiln.core"]
    assert kiln.InvalidHP is kiln.core.InvalidHP
    assert kiln.get_cluster_info is kiln._info.get_cluster_info
    assert kiln.ClusterInfo is kiln._info.ClusterInfo and kiln.TrialInfo is kiln._info.TrialInfo
    assert set(kiln.__all__) <= set(dir(kiln))
    with pytest.raises(AttributeError):
        kiln.no_such_name  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize("statement", ["import kiln", "import kiln.core", "import kiln as det; det.core.init",
                                       "import kiln.client", "import kiln.cli"])
def test_torch_loads_only_with_kiln_pytorch(statement: str) -> None:
    assert "torch" not in _roots(_loaded_after(statement)), statement
    assert "torch" in _roots(_loaded_after("from kiln import pytorch"))


def test_kiln_pytorch_is_the_lazy_submodule() -> None:
    import kiln

    assert kiln.pytorch is importlib.import_module("kiln.pytorch")
    assert "pytorch" in dir(kiln)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # the name may be a module
    return found


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_schemas_is_the_floor_everything_stands_on() -> None:
    for path in _files("schemas"):
        assert not _roots(_imports(path)) & {"kiln", "services", "deploy"}, path


def test_no_module_of_the_sdk_but_the_cli_reaches_into_services_or_deploy() -> None:
    for path in _files("kiln"):
        if path.name != "cli.py":  # its operator commands import the machinery inside the command
            assert not _roots(_imports(path)) & {"services", "deploy"}, path


def test_services_import_no_sdk_and_no_other_service() -> None:
    for path in _files("services"):
        own = path.relative_to(REPO / "services").parts
        allowed = {"services", "services.runtime"} | ({f"services.{own[0]}"} if len(own) > 1 else set())
        for module in _imports(path):
            root = module.split(".")[0]
            assert root not in ("kiln", "deploy"), (path, module)
            if root == "services":
                assert ".".join(module.split(".")[:2]) in allowed, (path, module)


def test_the_launchers_and_the_determined_shim_load_only_when_run() -> None:
    for statement in ("import kiln", "import kiln.core", "import determined", "import kiln.launch"):
        loaded = _loaded_after(statement)
        assert not {m for m in loaded if m.startswith("kiln.launch.")}, statement
        assert "torch" not in _roots(loaded), statement
    assert "kiln.launch" not in _loaded_after("import kiln; import kiln.core")


def test_the_sdk_loads_only_when_named() -> None:
    assert "kiln.experimental.client" not in _loaded_after("import kiln")
    assert "kiln.experimental.client" in _loaded_after("from kiln.experimental import client")
    assert "kiln.models" not in _loaded_after("import kiln")
    assert "kiln.models" in _loaded_after("import kiln; kiln.models.load")
