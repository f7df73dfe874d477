"""Fuzz the events target (bench/fuzz/targets.py):
`python bench/fuzz/fuzz_events.py -atheris_runs=1000000`."""

from fuzz_main import main

if __name__ == "__main__":
    main("events")
