"""peakllm: make real LLMs smaller and faster, and prove it with measurements."""

from peakllm.errors import PeakError

__version__ = "0.1.0"
__all__ = ["PeakError", "__version__"]
