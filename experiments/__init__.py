"""The user-facing layer: the ``servesim`` CLI, comparisons, capacity search, validation, plots."""
