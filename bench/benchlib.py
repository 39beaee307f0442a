"""What the benchmarks share: a table printer and a CPU-time probe (not a benchmark itself)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def print_table(header: Sequence, rows: Sequence[Sequence]) -> None:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _stats() -> dict[int, list[str]]:
    """The fields of /proc/<pid>/stat after the process name, by pid (Linux)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:         # the process ended while /proc was being read
            continue
        out[int(entry.name)] = stat[stat.rindex(")") + 2:].split()
    return out


def descendants(stats: dict[int, list[str]] | None = None) -> list[int]:
    """Every process below this one (Ray's GCS, raylet, workers and actors)."""
    stats = _stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) used so far by this process and every process it
    started: Ray's GCS, raylet, workers and actors. Read from /proc (Linux); unlike wall time,
    other people's work on the machine barely changes it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = _stats()
    tree = [os.getpid(), *descendants(stats)]
    return sum((int(stats[p][11]) + int(stats[p][12])) / tick for p in tree if p in stats)

def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A markdown table (docs/benchmarks.md's form), numbers right-aligned."""
    def align(column: int) -> str:
        numeric = all(isinstance(r[column], (int, float)) or str(r[column]).strip() == ""
                      or _number(str(r[column])) for r in rows)
        return "---:" if rows and numeric else "---"

    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join(align(i) for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True
