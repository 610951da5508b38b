"""Shared by the benchmarks: machine description, process pinning, result recording."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` pinned to one CPU with taskset, when there is more than one and taskset exists."""
    if cpu is None or (os.cpu_count() or 1) < 2:
        return command
    try:
        subprocess.run(["taskset", "-c", str(cpu), "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return command
    return ["taskset", "-c", str(cpu), *command]


def record(title: str, command: str, table: str, notes: str = "") -> None:
    """Append a dated section to docs/BENCHMARKS.md."""
    BENCHMARKS_MD.parent.mkdir(exist_ok=True)
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nEvery figure here was printed by a script in `bench/`, "
                                 "run with the command shown, on the machine shown.\n")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} ({stamp})\n\n- Machine: {machine()}\n- Command: `{command}`\n\n{table}\n")
    if notes:
        section += f"\n{notes}\n"
    with BENCHMARKS_MD.open("a") as handle:
        handle.write(section)
    print(f"recorded in {BENCHMARKS_MD.relative_to(REPO)}", file=sys.stderr)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(args: argparse.Namespace, title: str, script: str, result: object, table: str, notes: str = "") -> None:
    """Print the result (one JSON object with --json, else the table and notes) and, with --record, append
    it to docs/BENCHMARKS.md with the command that reproduces it."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table)
        if notes:
            print()
            print(notes)
    if args.record:
        flags = " ".join(a for a in sys.argv[1:] if a != "--record")
        record(title, f"python {script} {flags} --record".replace("  ", " "), table, notes)
