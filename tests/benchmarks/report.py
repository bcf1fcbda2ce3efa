"""Write a benchmark's Markdown into its own section of a docs page, leaving other sections alone."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[2] / "docs"


def machine() -> str:
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def update_section(page: str, name: str, markdown: str) -> Path:
    """Replace (or append) the block between `<!-- bench:NAME -->` markers in docs/PAGE."""
    path = DOCS / page
    text = path.read_text() if path.exists() else "# Performance\n\nMeasured figures; each section names the script that wrote it.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def publish(name: str, lines: list[str], page: str = "performance.md") -> str:
    """Print a benchmark's Markdown lines and write them as section `name` of docs/PAGE."""
    md = "\n".join(lines)
    print(md)
    update_section(page, name, md)
    return md
