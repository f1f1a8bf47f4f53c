"""Runnable examples of :mod:`fastgen.train` (``python -m fastgen.train.examples.digits``)."""
