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
