"""The summary a run prints at its end (``reduce``, ``status``, ``reprocess``, ``demo``): frames by kind and
status, masters and stacks, as lines of text."""

from __future__ import annotations

from typing import Any

__all__ = ["summary_lines"]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Lines for a summary as made by :meth:`nightshift.daemon.pipeline.Pipeline.summary`."""
    lines = ["frames by kind and status:"]
    for kind, statuses in sorted(summary["frames"].items()):
        parts = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items()))
        lines.append(f"  {kind:9s} {sum(statuses.values()):4d}  ({parts})")
    masters = ", ".join(f"{k} {n}" for k, n in sorted(summary["masters"].items())) or "none"
    lines.append(f"masters: {masters}")
    lines.append(f"stacks: {len(summary['stacks'])}")
    for s in summary["stacks"]:
        what = f"{s['object']} {s['filter'] or 'no filter'} {s['exptime']:g}s"
        lines.append(f"  {what} night {s['night']}: {s['n_frames']} frames, {s['state']}  -> {s['path']}")
    return lines
