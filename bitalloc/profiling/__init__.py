"""Profiling: calibration statistics, the profile run, its table and resume log, torchrun.

Import the modules (`profiler`, `calibration`, `table`, `settings`) directly; this package
loads nothing heavy on import.
"""
