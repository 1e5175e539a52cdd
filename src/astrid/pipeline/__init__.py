"""Wiring of the science stages: adapters that load, run and save."""
