"""lac: localized additive composition (arXiv 2605.23147) on any HF causal LM."""

__version__ = "0.1.0"

import time as _time

STARTED = _time.monotonic()  # the process's start-up (imports, Hydra) is timed from here
