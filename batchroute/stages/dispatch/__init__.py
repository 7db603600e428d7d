"""Dispatch stage: call each model within its limits and turn every outcome into a row."""
