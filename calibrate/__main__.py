"""``python -m calibrate ...``: the ``servesim calibrate`` command, runnable on its own."""

from experiments.commands.calibrate import calibrate

calibrate(prog_name="python -m calibrate")
