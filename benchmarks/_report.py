"""Write a benchmark's table to benchmarks/results/NAME.md with the date, machine and command."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line describing where the figures were taken: cores, memory, GPU or not, torch."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_s = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_s = ""
    return (f"{platform.machine()}, {os.cpu_count()} cores{mem_s}, {gpu}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, python {platform.python_version()}")


def provenance(command: str) -> str:
    """`command` as this process ran it: with the ``OMP_NUM_THREADS`` of its environment and the
    ``taskset -c CPUS`` it was pinned by (before its ``python``), where it does not name them
    itself, and the commit it ran at, "with uncommitted changes" where the code differs from it
    (results files aside)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and "OMP_NUM_THREADS" not in command:
        command = f"OMP_NUM_THREADS={threads} {command}"
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = []
    if cpus and len(cpus) < (os.cpu_count() or 0) and "taskset" not in command:
        listed = ",".join(map(str, cpus))
        command = re.sub(r"(^|\s)python ", rf"\1taskset -c {listed} python ", command, count=1)
    root = RESULTS.parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"`{command}`"
    return f"`{command}`" + (f" at commit {sha}" + (" with uncommitted changes" if dirty else "") if sha else "")


def write_result(name: str, title: str, command: str | None, table_markdown: str, notes: str = "",
                 then: bool = False) -> Path:
    """Write the result file and return its path. `command` defaults to this process's argv; the
    file records it with the CPUs it was pinned to and the commit (:func:`provenance`). `then`: this
    run redid part of the table (some models' rows): the command line of the run before it is kept,
    and this one follows it ("...; then ...")."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    line = provenance(command or " ".join(["python", *sys.argv]))
    if then and path.exists():
        before = next((k[len("- command: "):] for k in path.read_text().splitlines() if k.startswith("- command: ")),
                      None)
        line = f"{before}; then {line}" if before else line
    text = (f"# {title}\n\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
            f"- machine: {machine()}\n- command: {line}\n\n{table_markdown.rstrip()}\n")
    if notes:
        text += f"\n{notes.rstrip()}\n"
    path.write_text(text)
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
