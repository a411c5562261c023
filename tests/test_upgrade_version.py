"""The release's one version: setup.cfg's, the package's and the one the daemon names."""

from __future__ import annotations

import configparser
from pathlib import Path

import tradecanvas
from tradecanvas.ops.build import VERSION


def test_the_version_is_setup_cfgs() -> None:
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    assert config["metadata"]["version"] == VERSION == tradecanvas.__version__
