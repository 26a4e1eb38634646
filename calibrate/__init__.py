"""Calibration: time controlled steps of the real engine, fit a cost model, write a profile.

``grid`` lists the steps, ``measure`` times them through ``runtime.runner.ModelRunner``,
``samples`` reads and writes step timings as CSV, ``fit`` fits the cost model and its held-out
error, ``profile`` is the versioned JSON and :class:`~calibrate.profile.CalibratedCost`.
"""
