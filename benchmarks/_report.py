"""Write a benchmark's table to benchmarks/results/NAME.md with the date, machine and command."""
from __future__ import annotations

import datetime
import os
import platform
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


def write_result(name: str, title: str, command: str | None, table_markdown: str, notes: str = "") -> Path:
    """Write the result file and return its path. `command` defaults to this process's argv."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["python", *sys.argv])
    text = (f"# {title}\n\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
            f"- machine: {machine()}\n- command: `{command}`\n\n{table_markdown.rstrip()}\n")
    if notes:
        text += f"\n{notes.rstrip()}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
