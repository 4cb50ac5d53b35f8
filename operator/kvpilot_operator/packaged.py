"""The files kvpilot ships inside its package, found with importlib.resources.

`crds/`, `policies/`, the chart's Prometheus `rules/` and Grafana `dashboards/`, and the
`examples/` (the quickstart LLMService) travel in the wheel under `kvpilot_operator/data/`, so an
installed `kvpilot` (a container image, a plain `pip install`) renders, checks and starts the local
stack without a checkout. In a checkout those folders are symlinks to the repository's own, which
stay the ones people edit.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA = ("crds", "policies", "rules", "dashboards", "examples")


def packaged(name: str) -> Path:
    """One of the DATA folders of the installed package."""
    if name not in DATA:
        raise ValueError(f"no packaged data folder {name!r} (there are: {', '.join(DATA)})")
    with resources.as_file(resources.files("kvpilot_operator") / "data" / name) as path:
        # Resolved: kubectl 1.20 reads a symlink to a folder as a file.
        return Path(path).resolve()


def source_tree() -> Path | None:
    """The repository root when kvpilot runs from a checkout (editable install), else None: the
    generators (`kvpilot crds`, `kvpilot observability`) also keep the chart's copies and the
    docs in step there."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "charts" / "kvpilot").is_dir():
        return root
    return None
