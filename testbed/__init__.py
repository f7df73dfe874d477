"""EdgeLLM Testbed: LLMs at the emulated mobile edge."""

from testbed import omp

omp.apply()  # before anything loads torch: libgomp reads its environment once
