"""Keep library chatter (progress bars, advisories, tracer warnings) off a command's terminal."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' progress bars and advisories and torch's tracer warnings.

    Called by commands that load torch models (export, init-random, the bench's diffusers child), whose
    own progress lines would otherwise be buried. Imports diffusers and transformers: export side only.
    """
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
