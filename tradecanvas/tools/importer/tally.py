"""What ``tradecanvas import`` did, and the summary it prints. Plain data, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from tradecanvas.model import MINUTE
from tradecanvas.tools.importer.fresh import Written
from tradecanvas.tools.tally import iso_minute


@attrs.define
class SeriesTally:
    """One series: candles read (base) or written (derived), by outcome."""

    derived: bool
    read: int = 0
    new: int = 0
    revised: int = 0
    files: int = 0
    verified: int = 0  # zips whose .CHECKSUM matched
    filed: int = 0  # candles of the files committed whole (read - filed: a file's part)
    holes: list[tuple[int, int]] = attrs.field(factory=list)
    cuts: list[tuple[int, int]] = attrs.field(factory=list)  # a file's last day(s) missing

    @property
    def unchanged(self) -> int:
        return self.read - self.new - self.revised


def merge_holes(holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[from, to)`` runs, sorted, adjacent and overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(holes):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def describe_hole(start: int, end: int) -> str:
    minutes = (end - start) // MINUTE
    last = iso_minute(end - MINUTE)
    span = iso_minute(start) if minutes == 1 else f"{iso_minute(start)}..{last}"
    return f"{span} ({minutes:,} min)"


@attrs.define
class ImportTally:
    """Every series the import touched, in the order first met; the files done."""

    series: dict[str, SeriesTally] = attrs.field(factory=dict)
    files_done: int = 0
    files_total: int = 0
    pending_before: bool = False  # an interrupted import's event was still owed
    events: int = 0

    def _of(self, sid: str, derived: bool) -> SeriesTally:
        found = self.series.get(sid)
        if found is None:
            found = self.series[sid] = SeriesTally(derived)
        return found

    def record_file(
        self,
        sid: str,
        *,
        verified: bool,
        holes: Sequence[tuple[int, int]],
        candles: int = 0,
        cut: tuple[int, int] | None = None,
    ) -> None:
        tally = self._of(sid, False)
        tally.files += 1
        tally.filed += candles
        if cut is not None:  # reported on its own line, not as a hole at Binance
            holes = [h for h in holes if h != cut]
            tally.cuts.append(cut)
        tally.verified += verified
        tally.holes = merge_holes([*tally.holes, *holes])
        self.files_done += 1

    def record_commit(self, sid: str, received: int, written: Sequence[Written]) -> None:
        self._of(sid, False).read += received
        for w in written:
            tally = self._of(w.series_id, w.derived)
            tally.new += w.rows - w.revised
            tally.revised += w.revised
            if w.derived:
                tally.read += w.rows

    @property
    def changed(self) -> bool:
        return any(t.new or t.revised for t in self.series.values())

    def summary_lines(self, elapsed_s: float) -> list[str]:
        lines: list[str] = []
        for sid, t in self.series.items():
            if t.derived:
                lines.append(f"{sid}: {t.new:,} new, {t.revised:,} revised (derived)")
                continue
            files = (
                f"{t.files} file{'s' if t.files != 1 else ''}"
                f" ({t.verified} checksum{'s' if t.verified != 1 else ''} verified)"
            )
            partial = t.read - t.filed
            if partial > 0:  # interrupted: a file committed in part (its rest on the next run)
                files = (
                    f"{t.filed:,} from {files} and {partial:,} of the next file, committed in part"
                )
                lines.append(
                    f"{sid}: {t.read:,} candles: {files}: {t.new:,} new, {t.unchanged:,}"
                    f" unchanged, {t.revised:,} revised"
                )
            else:
                lines.append(
                    f"{sid}: {t.read:,} candles from {files}:"
                    f" {t.new:,} new, {t.unchanged:,} unchanged, {t.revised:,} revised"
                )
            if t.holes:
                total = sum((b - a) // MINUTE for a, b in t.holes)
                lines.append(
                    f"{sid}: {total:,} minutes missing in the files (holes at Binance): "
                    + ", ".join(describe_hole(a, b) for a, b in t.holes)
                )
            elif not t.cuts:
                lines.append(f"{sid}: no holes")
            if t.cuts:
                total = sum((b - a) // MINUTE for a, b in t.cuts)
                lines.append(
                    f"{sid}: {total:,} minutes missing after a file's last row to its period's"
                    " end (a file cut short? check it, fetch it again): "
                    + ", ".join(describe_hole(a, b) for a, b in t.cuts)
                )
        if not self.changed:
            # "already stored" only when every file was read: a refused file stored nothing
            complete = self.files_done == self.files_total
            lines.append(
                "nothing changed: every candle was already stored"
                if complete
                else "nothing changed in the store"
            )
        lines.append(
            f"{self.files_done} of {self.files_total} files imported in {elapsed_s:.1f} s;"
            f" {self.events} factor.rebuild event{'s' if self.events != 1 else ''} logged"
        )
        return lines


__all__ = ["ImportTally", "SeriesTally", "describe_hole", "merge_holes"]
