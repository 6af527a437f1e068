"""The benchmark harness from a checkout: ``python benchmarks/run.py ARGS`` is ``sd-engine bench ARGS``.

    python benchmarks/run.py --preset sd15 --size 256 --runs 3 --out benchmarks/results

See ``engine/bench/`` for the harness and ``python benchmarks/run.py --help`` for the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
