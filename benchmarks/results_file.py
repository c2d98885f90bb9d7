"""Read-modify-write of benchmarks/results.json: each benchmark owns one top-level section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"


def update_section(section: str, figures: dict[str, Any], path: Path = RESULTS) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = figures
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
