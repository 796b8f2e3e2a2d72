"""DVC must not phone home: no analytics, no update check."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_analytics_and_update_check_are_off():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config.get("core", "analytics") == "false"
    assert config.get("core", "check_update") == "false"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in readme and command in (ROOT / ".ci" / "run").read_text()


def test_ci_installs_the_lock_file_and_it_pins_every_declared_dependency():
    import re
    import tomllib

    from packaging.requirements import Requirement

    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements.lock" in ci
    assert ci.index("pip install -r requirements.lock") < ci.index('pip install -e ".[test]"')
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in declared:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pinned, f"{requirement.name} is not in requirements.lock (python .ci/lock.py)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} breaks {requirement}"
