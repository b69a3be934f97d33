"""Long-sequence modules, one file per method; registered in :mod:`tfmodels.registry`."""
