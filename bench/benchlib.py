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


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) used so far by this process and every process it
    started: Ray's GCS, raylet, workers and actors. Read from /proc (Linux); unlike wall time,
    other people's work on the machine barely changes it."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:         # the process ended while /proc was being read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(child for child, p in parent.items() if p == pid and child not in tree)
    return sum(cpu.get(pid, 0.0) for pid in tree)


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
