"""The release's one version: setup.cfg's, the package's and the one the daemon names."""

from __future__ import annotations

import configparser
from pathlib import Path

import tradecanvas
from tradecanvas.ops.build import VERSION
from tradecanvas.ops.metrics import Metrics


def test_the_version_is_setup_cfgs() -> None:
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    assert config["metadata"]["version"] == VERSION == tradecanvas.__version__


def test_every_metric_is_in_the_operations_metrics_table() -> None:
    """The doc audit does not check the table: tradecanvas_build_info (and every other
    family the daemon registers) must have its row."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    table = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = {
        family.name
        for family in Metrics().registry.collect()
        if family.name.startswith("tradecanvas_")
    }
    assert "tradecanvas_build_info" in names
    assert {n for n in names if not any(f"`{n}" in row for row in rows)} == set()
