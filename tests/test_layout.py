"""The package's shape, checked: module sizes, the import order of the stages, and the pure
cores that must load without trio (docs/architecture.md explains each rule)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

PACKAGE: Final = Path(__file__).resolve().parent.parent / "tradecanvas"
MAX_LINES: Final = 500
# the import order of the stages: a module may import its own stage and those before it
STAGES: Final = (
    ("tradecanvas.errors", "tradecanvas.model"),
    ("tradecanvas.wire",),
    ("tradecanvas.runtime_flags", "tradecanvas.service_urls"),
    ("tradecanvas.ops",),
    ("tradecanvas.upstream",),
    ("tradecanvas.store",),
    ("tradecanvas.pipeline",),
    ("tradecanvas.ingest",),
    # the publisher is a pipeline sink; the feed is read by serve (an edge's Hub)
    ("tradecanvas.bus",),
    ("tradecanvas.serve",),
    ("tradecanvas.daemon",),
    ("tradecanvas.tools",),
    ("tradecanvas.cli", "tradecanvas.__main__", "tradecanvas"),
)
# pure cores: rules only, time passed in; they load without trio or any socket library
PURE_MODULES: Final = (
    "tradecanvas.model",
    "tradecanvas.service_urls",
    "tradecanvas.wire.binance",
    "tradecanvas.wire.binance_rest",
    "tradecanvas.wire.json",
    "tradecanvas.wire.kline_csv",
    "tradecanvas.wire.archive",
    "tradecanvas.pipeline.derive",
    "tradecanvas.pipeline.levels",
    "tradecanvas.pipeline.recent",
    "tradecanvas.ingest.tracker",
    "tradecanvas.ingest.batcher",
    "tradecanvas.ingest.forming",
    "tradecanvas.ingest.ordering",
    "tradecanvas.ingest.core",
    "tradecanvas.ingest.outcomes",
    "tradecanvas.ingest.flush_summary",
    "tradecanvas.ingest.minute_ranges",
    "tradecanvas.ingest.behind_head",
    "tradecanvas.serve.subscriber_queue",
    "tradecanvas.serve.drain",
    "tradecanvas.serve.subscription",
    "tradecanvas.serve.outgoing",
    "tradecanvas.serve.encoded",
    "tradecanvas.serve.ws_protocol",
    "tradecanvas.serve.http_validation",
    "tradecanvas.pipeline.events",
    "tradecanvas.store.types",
    "tradecanvas.upstream.plan",
    "tradecanvas.tools.subscribe_cursors",
    "tradecanvas.tools.tally",
    "tradecanvas.wire.bus",
    "tradecanvas.bus.ids",
    "tradecanvas.bus.outbox",
    "tradecanvas.bus.cursors",
    "tradecanvas.bus.lease",
    "tradecanvas.bus.replies",
    "tradecanvas.bus.outage_log",
)
IO_LIBRARIES: Final = (
    "trio",
    "trio_websocket",
    "httpx",
    "hypercorn",
    "starlette",
    "sqlite3",
    "coredis",
    "anyio",
)


def _modules() -> list[tuple[str, Path]]:
    result = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        result.append((".".join(parts), path))
    return result


def _stage(module: str) -> int:
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index
    raise AssertionError(f"{module} belongs to no stage; add it to STAGES")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "tradecanvas" or name.startswith("tradecanvas.")}


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_a_module_imports_only_its_own_stage_and_those_before_it(module: str, path: Path) -> None:
    own = _stage(module)
    later = {name for name in _imports(path) if _stage(name) > own}
    assert later == set(), f"{module} (stage {own}) imports later stages"


def test_stage_package_init_files_import_nothing() -> None:
    """So that importing a pure core never drags in its package's I/O modules (the tools'
    packages re-export their command's names: nothing is built on them)."""
    heavy = [
        name
        for name, path in _modules()
        if path.name == "__init__.py"
        and name != "tradecanvas"
        and not name.startswith("tradecanvas.tools")
        and _imports(path)
    ]
    assert heavy == []


def test_pure_cores_load_without_io_libraries() -> None:
    code = (
        "import sys\n"
        f"for name in {list(PURE_MODULES)!r}: __import__(name)\n"
        f"loaded = sorted(m for m in {list(IO_LIBRARIES)!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
