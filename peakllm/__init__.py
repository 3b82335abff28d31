"""peakllm: make real LLMs smaller and faster, and prove it with measurements."""

import os

# With libgomp's default spin-waiting, OpenMP threads (torch's and our kernels') that find their core
# busy collapse ~20x on a shared 2-core machine (16.5 -> 0.75 tok/s measured); passive waiting costs
# microseconds per parallel region. Must be set before torch loads; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from peakllm.errors import PeakError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PeakError", "__version__"]
