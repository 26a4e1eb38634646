"""Calibration: time controlled steps of the real engine, fit a cost model, write a profile.

- :mod:`calibrate.grid` - the steps to time (prefill, decode, mixed), bounded by the model and the KV pool;
- :mod:`calibrate.measure` - timing them through ``runtime.runner.ModelRunner``, and the host link;
- :mod:`calibrate.samples` - a measured step, and the samples CSV (read with errors naming file, line, field);
- :mod:`calibrate.fit` - the step-cost model (non-negative, with knees) and its held-out error;
- :mod:`calibrate.profile` - the versioned profile JSON and :class:`~calibrate.profile.CalibratedCost`;
- :mod:`calibrate.calibration` - a whole calibration, or a profile from a CSV measured elsewhere.

Only ``measure`` and ``calibration.run_calibration`` need torch; fitting and profiles do not.
"""
