"""Plots and summary tables."""
