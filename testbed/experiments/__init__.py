"""Experiment suites: runner, metrics, analytic model."""
