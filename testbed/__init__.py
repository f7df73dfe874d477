"""EdgeLLM Testbed: LLMs at the emulated mobile edge."""
