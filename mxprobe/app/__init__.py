"""The application layer: the ``mxprobe`` command (:mod:`mxprobe.app.cli`), reading run
directories (:mod:`mxprobe.app.runs`), plots and the report.

Top of the layers (core → callbacks → models → application): it may import everything below,
nothing below imports it.
"""
