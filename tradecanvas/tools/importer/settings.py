"""Which derived timeframes ``tradecanvas import`` derives: the store's recorded ones.

Each base series' derivation fingerprint is stored in meta (``fingerprint:<series_id>``) by
the pipeline that last wrote it — the daemon's ``TRADE_CANVAS_DERIVED_TIMEFRAMES`` for a store
``serve`` fills. A commit under another fingerprint rebuilds every derived bar of the series'
whole history and logs a ``factor.rebuild`` (reason ``fingerprint``) that every subscriber
receives — and the daemon, still running with its own settings, does it all again at its next
start. So an import derives what the store records unless the operator said otherwise:

* not given (neither ``--derived-timeframes`` nor a ``TRADE_CANVAS_DERIVED_TIMEFRAMES`` other
  than the default): the store's recorded set is used (the imported series' own; for series new
  to the store, the one every other base series records), with an INFO line;
* given and different from what an imported series records: refused (exit 2) naming both,
  unless ``--rebuild-derived`` asks for the rebuild.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence

import attrs

from tradecanvas.errors import BadInputError, SeriesIdError
from tradecanvas.model import SeriesId, Timeframe
from tradecanvas.runtime_flags import FLAG_SPECS, RuntimeFlags
from tradecanvas.store.interface import MarketStore

log = logging.getLogger("tradecanvas.tools.importer")

_SPEC = next(spec for spec in FLAG_SPECS if spec.field == "derived_timeframes")
FINGERPRINT_KEY = "fingerprint:"


@attrs.frozen
class Derivation:
    """The derived timeframes to commit with and their fingerprint; ``explicit``: the operator
    gave them (an option, or a variable other than the default); ``rebuild``: a fingerprint
    other than the store's is wanted (``--rebuild-derived``)."""

    timeframes: tuple[Timeframe, ...]
    fingerprint: str
    explicit: bool = True
    rebuild: bool = False


class DerivationConflict(BadInputError):
    """The import's derived timeframes are not the store's recorded ones (exit 2)."""


def from_flags(flags: RuntimeFlags, *, option_given: bool, rebuild: bool) -> Derivation:
    """The flags' derivation; explicit when the option was given or the value (from the
    environment) is not the default (a variable set to the default reads as not given)."""
    default = _SPEC.parse(_SPEC.default) if _SPEC.default is not None else ()
    explicit = option_given or tuple(sorted(flags.derived_timeframes)) != tuple(sorted(default))
    return Derivation(
        tuple(flags.derived_timeframes), flags.derivation_fingerprint(), explicit, rebuild
    )


def add_rebuild_option(parser: argparse.ArgumentParser) -> None:
    """``--rebuild-derived`` (``import``, ``backfill``)."""
    parser.add_argument(
        "--rebuild-derived",
        action="store_true",
        help="derive the flags' timeframes even where the store records others: every derived"
        " bar of the series' whole history is rebuilt (default: refused, exit 2; with no"
        " --derived-timeframes or TRADE_CANVAS_DERIVED_TIMEFRAMES the store's are used)",
    )


def _timeframes_text(timeframes: Iterable[Timeframe]) -> str:
    return ",".join(tf.text for tf in sorted(timeframes)) or "none"


def parse_fingerprint(text: str, like: Derivation) -> tuple[Timeframe, ...] | None:
    """The derived timeframes a stored fingerprint of this release's form names, else None."""
    prefix, sep, listed = text.partition(";derived=")
    ours, _, _ = like.fingerprint.partition(";derived=")
    if not sep or prefix != ours:
        return None
    if not listed:
        return ()
    try:
        parsed: tuple[Timeframe, ...] = tuple(_SPEC.parse(listed))
    except ValueError:
        return None
    return parsed if f"{prefix};derived={_timeframes_text(parsed)}" == text else None


def describe(text: str, like: Derivation) -> str:
    parsed = parse_fingerprint(text, like)
    return f"{text!r}" if parsed is None else _timeframes_text(parsed)


async def recorded_fingerprints(
    store: MarketStore, series: Sequence[SeriesId]
) -> tuple[dict[str, str], set[str]]:
    """(fingerprint of each of ``series`` that records one, the fingerprints every other base
    series of the store records)."""
    own: dict[str, str] = {}
    for sid in series:
        value = await store.get_meta(FINGERPRINT_KEY + str(sid))
        if value is not None:
            own[str(sid)] = value
    wanted = {str(s) for s in series}
    others: set[str] = set()
    for key in await store.heads():
        if key in wanted:
            continue
        try:
            if SeriesId.parse(key).timeframe.text != "1m":
                continue
        except SeriesIdError:
            continue
        value = await store.get_meta(FINGERPRINT_KEY + key)
        if value is not None:
            others.add(value)
    return own, others


def choose(
    given: Derivation, own: dict[str, str], others: set[str], command: str = "import"
) -> Derivation:
    """The derivation ``command`` (``import``, ``backfill``) commits with; raises
    DerivationConflict (see the module)."""
    if given.rebuild:
        changed = sorted(sid for sid, fp in own.items() if fp != given.fingerprint)
        if changed:
            log.warning(
                "%s: --rebuild-derived: every derived bar of %s is rebuilt under %s"
                " (factor.rebuild, reason fingerprint, for the whole history)",
                command,
                ", ".join(changed),
                _timeframes_text(given.timeframes),
            )
        return given
    differing = {sid: fp for sid, fp in own.items() if fp != given.fingerprint}
    if differing:
        values = set(differing.values())
        stored = next(iter(values))
        parsed = parse_fingerprint(stored, given)
        if not given.explicit and len(set(own.values())) == 1 and parsed is not None:
            log.info(
                "%s: deriving %s as the store records for %s (not %s: no"
                " --derived-timeframes or TRADE_CANVAS_DERIVED_TIMEFRAMES given)",
                command,
                _timeframes_text(parsed),
                ", ".join(sorted(own)),
                _timeframes_text(given.timeframes),
            )
            return attrs.evolve(given, timeframes=parsed, fingerprint=stored)
        names = "; ".join(f"{sid}: {describe(fp, given)}" for sid, fp in sorted(differing.items()))
        how = (
            "run it with the daemon's TRADE_CANVAS_DERIVED_TIMEFRAMES (leave it and"
            " --derived-timeframes unset to use the store's)"
            if len(set(own.values())) == 1
            else "import these series in separate runs, with no --derived-timeframes"
        )
        raise DerivationConflict(
            f"the store records other derived timeframes than this {command}'s"
            f" {_timeframes_text(given.timeframes)} — {names}; committing with"
            " them would rebuild every derived bar of the whole history (factor.rebuild"
            " events to every subscriber), and a daemon still running with the store's"
            f" settings would rebuild them back at its next start. Nothing imported: {how},"
            f" or add --rebuild-derived to rebuild under this {command}'s timeframes"
        )
    if own or given.explicit or len(others) != 1 or given.fingerprint in others:
        return given
    stored = next(iter(others))
    parsed = parse_fingerprint(stored, given)
    if parsed is None:
        return given
    log.info(
        "%s: deriving %s, as the store's other series record (not %s: no"
        " --derived-timeframes or TRADE_CANVAS_DERIVED_TIMEFRAMES given)",
        command,
        _timeframes_text(parsed),
        _timeframes_text(given.timeframes),
    )
    return attrs.evolve(given, timeframes=parsed, fingerprint=stored)


__all__ = [
    "Derivation",
    "DerivationConflict",
    "add_rebuild_option",
    "choose",
    "from_flags",
    "parse_fingerprint",
    "recorded_fingerprints",
]
