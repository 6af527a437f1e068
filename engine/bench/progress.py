"""Progress on stderr while a benchmark runs: which contender, which run, which step.

On a terminal the current step is redrawn in place; elsewhere (logs, CI) only whole lines appear,
one per generation.
"""

from __future__ import annotations

import sys
from typing import TextIO


def say(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stderr, flush=True)


class RunProgress:
    """Progress of one contender's generations, written by its child process."""

    def __init__(self, name: str, warmup: int, runs: int, stream: TextIO | None = None) -> None:
        self.name = name
        self.warmup = warmup
        self.runs = runs
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.current = ""

    def phase(self, generation: int) -> str:
        cold = " (cold)" if generation == 0 else ""
        if generation < self.warmup:
            return f"warm-up {generation + 1}/{self.warmup}{cold}"
        return f"run {generation - self.warmup + 1}/{self.runs}{cold}"

    def begin(self, generation: int) -> None:
        self.current = f"  {self.name}: {self.phase(generation)}"

    def step(self, step: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\r{self.current}  step {step}/{total}\x1b[K")
            self.stream.flush()

    def end(self, seconds: float) -> None:
        line = f"{self.current}  {seconds:.1f} s"
        self.stream.write(f"\r{line}\x1b[K\n" if self.live else f"{line}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        say(f"  {self.name}: {message}", self.stream)
