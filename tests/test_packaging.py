"""Packaging: the build requirements can build the metadata, the wheel carries the licence and the
extras, a missing extra is one clear line, every test dependency is declared, and constraints.txt
pins the whole dependency closure that scripts/venv.sh and the Containerfile install."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _applies(spec: str) -> bool:
    """False for a requirement whose marker excludes it here (an extra, another Python or platform)."""
    from packaging.requirements import Requirement

    marker = Requirement(spec).marker
    return marker is None or marker.evaluate({"extra": ""})


def test_build_backend_supports_the_spdx_license_string():
    # `license = "Apache-2.0"` (PEP 639) needs setuptools >= 77; older ones reject the string form
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if _requirement_name(r) == "setuptools"]
    minimum = re.search(r">=\s*([0-9.]+)", setuptools)
    assert minimum, setuptools
    assert tuple(int(part) for part in minimum.group(1).split(".")) >= (77,), setuptools


def test_license_file_is_the_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "LICENSE" in PYPROJECT["project"]["license-files"]


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory) -> email.message.Message:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("tokensmith-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(metadata))


def test_wheel_metadata_has_license_classifiers_urls_and_extras(wheel_metadata):
    assert wheel_metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in wheel_metadata.get_all("License-File")
    classifiers = wheel_metadata.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Programming Language :: Python :: 3.13" in classifiers
    urls = dict(url.split(", ", 1) for url in wheel_metadata.get_all("Project-URL"))
    assert {"Source", "Issues"} <= set(urls)
    assert {"vault", "aws", "all", "test"} <= set(wheel_metadata.get_all("Provides-Extra"))
    requires = wheel_metadata.get_all("Requires-Dist")
    core = {_requirement_name(r) for r in requires if "extra ==" not in r}
    # a file-only install does not pull AWS's library (boto3 is ~36 MB installed)
    assert "boto3" not in core and "hvac" not in core
    assert any(_requirement_name(r) == "boto3" and 'extra == "aws"' in r for r in requires)
    # Vault needs no library at all: hvac and requests only serve the tests
    assert not any(_requirement_name(r) in ("hvac", "requests") and 'extra == "test"' not in r for r in requires)
    assert any(r.startswith("tokensmith[") and 'extra == "all"' in r and "aws" in r and "vault" in r
               for r in requires)


def _imported_top_level_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared_closure() -> set[str]:
    """Distributions installed because of tokensmith[all,test]: declared ones and what they require."""
    project = PYPROJECT["project"]
    pending = [_requirement_name(r) for r in project["dependencies"]]
    for extra in ("vault", "aws", "test"):
        pending += [_requirement_name(r) for r in project["optional-dependencies"][extra]]
    seen = set()
    while pending:
        name = pending.pop()
        if name in seen or name == "tokensmith":
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pending += [_requirement_name(r) for r in requires if _applies(r)]
    return seen


def test_every_third_party_module_the_tests_import_is_declared():
    test_extra = {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    declared = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]} | test_extra
    for extra in ("vault", "aws"):
        declared |= {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    local = {path.stem for path in (REPO / "tests").rglob("*.py")} | {"tokensmith", "tests"}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in (REPO / "tests").rglob("*.py"):
        for module in _imported_top_level_modules(path):
            if module in sys.stdlib_module_names or module in local:
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not dists & declared:
                undeclared.setdefault(module, set()).add(path.name)
    # cryptography is one of them: tests import it directly (certificates), moto only brings it along
    assert "cryptography" in test_extra
    assert not undeclared, f"imported by tests but declared nowhere in pyproject.toml: {undeclared}"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_the_whole_dependency_closure():
    pins = _constraints()
    missing = sorted(name for name in _declared_closure() if name not in pins)
    assert not missing, f"constraints.txt does not pin: {missing}"
    assert "tokensmith" not in pins


def test_this_environment_was_installed_from_the_constraints():
    mismatched = {}
    for name, version in _constraints().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned for another interpreter or platform only
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"pinned vs installed: {mismatched}"


def test_venv_script_and_containerfile_use_the_constraints_and_all_extras():
    venv = (REPO / "scripts" / "venv.sh").read_text()
    assert '-c "$ROOT/constraints.txt"' in venv
    containerfile = (REPO / "Containerfile").read_text()
    assert "-c constraints.txt" in containerfile and "[all]" in containerfile
    for readme in (REPO / "README.md", REPO / "systemd" / "README.md"):
        assert "-c constraints.txt '.[all]'" in readme.read_text(), readme


AWS_CONFIG = """
state_dir: {state}
runtime_dir: {runtime}
health: {{enabled: false}}
aws: {{region: eu-west-1, endpoint_url: "http://127.0.0.1:9"}}
clients:
  - name: api
    token_url: http://127.0.0.1:9/token
    source: {{type: aws, secret_id: app/client}}
    sinks: [{{type: file, path: {runtime}/api.token}}]
"""

VAULT_CONFIG = """
state_dir: {state}
runtime_dir: {runtime}
health: {{enabled: false}}
vault: {{address: "http://127.0.0.1:9", auth: {{method: token, token: root}}}}
clients:
  - name: api
    token_url: http://127.0.0.1:9/token
    source: {{type: vault, path: app/client}}
    sinks: [{{type: file, path: {runtime}/api.token}}]
"""


@pytest.mark.parametrize("module, extra, template", [("boto3", "aws", AWS_CONFIG)])
@pytest.mark.parametrize("command", ["run", "once", "check-config"])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, module, extra, template, command):
    config = tmp_path / "config.yaml"
    config.write_text(template.format(state=tmp_path / "state", runtime=tmp_path / "run"))
    (tmp_path / "run").mkdir()
    # the library is made unimportable, as in an install without the extra
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None
        from tokensmith.cli import main
        sys.exit(main([{command!r}, "--config", {str(config)!r}]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSMITH_", "AWS_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if f"tokensmith[{extra}]" in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert module in lines[0]
    assert result.returncode == (7 if command == "check-config" else 78), result.stdout + result.stderr


@pytest.mark.parametrize("online", [False, True])
def test_a_vault_config_needs_no_extra_library(tmp_path, online):
    config = tmp_path / "config.yaml"
    config.write_text(VAULT_CONFIG.format(state=tmp_path / "state", runtime=tmp_path / "run"))
    (tmp_path / "run").mkdir()
    code = textwrap.dedent(f"""
        import sys
        for module in ("hvac", "requests", "urllib3"):
            sys.modules[module] = None
        from tokensmith.cli import main
        sys.exit(main(["check-config", "--config", {str(config)!r}] + (["--online"] if {online!r} else [])))
    """)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKENSMITH_", "AWS_", "HTTP", "http", "NO_", "no_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "tokensmith[vault]" not in output and "not installed" not in output, output
    if not online:
        assert result.returncode == 0, output
    else:  # the check reaches for the (absent) server with no library in the way
        assert "cannot connect to http://127.0.0.1:9" in output, output


def test_importing_a_backend_module_without_its_library_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["boto3"] = None
        from tokensmith.errors import ConfigError
        try:
            import tokensmith.aws
        except ConfigError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'tokensmith[aws]'" in result.stdout, result.stdout + result.stderr


def test_scripts_test_fails_in_ci_without_python_3_13(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv"), "CI": "true"}
    assert not any(Path(d, "python3.13").exists() for d in env["PATH"].split(":")), "python3.13 in /usr/bin"
    result = subprocess.run([str(REPO / "scripts" / "test"), "--collect-only"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no Python 3.13 interpreter found" in result.stderr and "CI must test on 3.13" in result.stderr
    assert "collected" not in result.stdout  # it stopped before running anything
    # outside CI it says it tests on 3.11 only (and goes on)
    script = (REPO / "scripts" / "test").read_text()
    assert 'TOKENSMITH_PYTHONS:-3.11 3.13' in script and ".venv-3.13" in script
