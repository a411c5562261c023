"""The checks behind scripts/doc_audit.sh; prints one line per finding."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def sections(markdown: str) -> dict[str, str]:
    """Heading text → the body up to the next heading of the same or higher level."""
    result: dict[str, str] = {}
    # headings inside fenced code (shell comments, Prometheus # HELP lines) are not headings
    masked = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), markdown, flags=re.S)
    matches = list(re.finditer(r"^(#{1,6}) (.+)$", masked, re.M))
    for i, m in enumerate(matches):
        level = len(m.group(1))
        end = len(markdown)
        for later in matches[i + 1 :]:
            if len(later.group(1)) <= level:
                end = later.start()
                break
        result[m.group(2).strip()] = markdown[m.end() : end]
    return result


def routes() -> list[str]:
    """Every HTTP route and WS path the package serves, read from the source."""
    found: set[str] = set()
    for path in (ROOT / "tradecanvas").rglob("*.py"):
        text = path.read_text()
        found.update(re.findall(r"""Route\(\s*["'](/[^"']*)["']""", text))
        found.update(re.findall(r"""WS_PATH\b[^=\n]*=\s*["'](/[^"']*)["']""", text))
    # a path parameter is documented by its name: /assets/{path:path} is /assets/{path}
    return sorted({re.sub(r"\{(\w+):\w+\}", r"{\1}", route) for route in found})


def check_api(problems: list[str]) -> None:
    api = ROOT / "docs" / "api.md"
    if not api.is_file():
        problems.append("docs/api.md is missing")
        return
    secs = sections(api.read_text())
    for route in routes():
        matching = [
            body
            for head, body in secs.items()
            if re.search(rf"`?{re.escape(route)}`?(\s|$)", head + " ")
        ]
        if not matching:
            problems.append(f"docs/api.md: no section whose heading names {route}")
            continue
        body = max(matching, key=len)
        prose = re.sub(r"```.*?```", "", body, flags=re.S).strip()
        if len(prose) < 40:
            problems.append(f"docs/api.md: the {route} section does not describe its semantics")
        blocks = re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S)
        examples = [
            b
            for lang, b in blocks
            if "curl " in b or "tradecanvas subscribe" in b or "websocat" in b or "wscat" in b
        ]
        if not examples:
            problems.append(f"docs/api.md: the {route} section has no curl or WebSocket example")
        # /metrics answers in Prometheus' text format, so its example is that text
        prometheus = route == "/metrics" and any("# TYPE " in b for _, b in blocks)
        # a route that answers with files (the chart page) shows its answer's headers
        not_json = any(
            lang == "http" and re.search(r"(?im)^content-type: (?!application/json)", b)
            for lang, b in blocks
        )
        if not prometheus and not not_json and not any(lang == "json" for lang, _ in blocks):
            problems.append(f"docs/api.md: the {route} section has no example JSON")


CONFIG_TABLE_HEADER = "| variable | `serve` option | default | meaning |\n|---|---|---|---|\n"


def config_table() -> str:
    """The variables table of docs/configuration.md, generated from runtime_flags.FLAG_SPECS
    (``scripts/doc_audit.sh --write-config-table`` rewrites it in place)."""
    from tradecanvas.runtime_flags import FLAG_SPECS

    rows = []
    for spec in FLAG_SPECS:
        default = "—" if spec.default is None else f"`{spec.default}`"
        rows.append(f"| `{spec.variable}` | `{spec.option}` | {default} | {spec.help} |")
    return CONFIG_TABLE_HEADER + "\n".join(rows) + "\n"


def _config_table_span(text: str) -> tuple[int, int] | None:
    start = text.find(CONFIG_TABLE_HEADER)
    if start < 0:
        return None
    end = text.find("\n\n", start)
    return start, (len(text) if end < 0 else end + 1)


def check_configuration(problems: list[str]) -> None:
    """docs/configuration.md's variables table is exactly the one the code generates, and
    every variable the code knows (flags and tools variables) is documented."""
    from tradecanvas.runtime_flags import KNOWN_VARIABLES

    doc = ROOT / "docs" / "configuration.md"
    text = doc.read_text() if doc.is_file() else ""
    span = _config_table_span(text)
    if span is None:
        problems.append("docs/configuration.md: no variables table")
    elif text[span[0] : span[1]] != config_table():
        problems.append(
            "docs/configuration.md: the variables table differs from runtime_flags.FLAG_SPECS;"
            " run scripts/doc_audit.sh --write-config-table"
        )
    for variable in sorted(KNOWN_VARIABLES):
        if f"`{variable}`" not in text:
            problems.append(f"docs/configuration.md: {variable} is not documented")


def write_config_table() -> None:
    doc = ROOT / "docs" / "configuration.md"
    text = doc.read_text()
    span = _config_table_span(text)
    assert span is not None, "docs/configuration.md has no variables table to replace"
    doc.write_text(text[: span[0]] + config_table() + text[span[1] :])


def check_make_targets(problems: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", makefile, re.M))
    readme = (ROOT / "README.md").read_text()
    for name in sorted(set(re.findall(r"\bmake ([a-z][A-Za-z0-9_-]*)", readme))):
        if name not in targets:
            problems.append(f"README.md names `make {name}`, which the Makefile does not have")


def check_links(problems: list[str]) -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    for md in files:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            rel = md.relative_to(ROOT)
            if not dest.exists():
                problems.append(f"{rel}: broken link {target}")
                continue
            if anchor and dest.suffix == ".md":
                anchors = {slug(h) for h in sections(dest.read_text())}
                if anchor not in anchors:
                    problems.append(f"{rel}: link {target} names a missing anchor")


def main() -> int:
    if sys.argv[1:] == ["--write-config-table"]:
        write_config_table()
    problems: list[str] = []
    for check in (check_api, check_configuration, check_make_targets, check_links):
        check(problems)
    for problem in problems:
        print(f"doc-audit: {problem}")
    checked = "routes " + ", ".join(routes())
    print(f"doc-audit: {'FAILED' if problems else 'ok'} ({checked})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
