"""The runtime's face: the Graph and Backend protocols every backend implements, and the one registry
that opens a backend by name.

Imports only numpy and the standard library; each backend module is imported when it is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.specs import GraphSpec


class Graph(Protocol):
    """A loaded network as the pipeline sees it."""

    spec: GraphSpec
    providers: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """Loads graph files of an engine folder."""

    name: str

    def load(
        self,
        network_file: Path,
        spec: GraphSpec,
        cache_dir: Path | None = None,
        content_hash: str | None = None,
    ) -> Graph: ...
