"""Conversion: capture a torch model, fold it into a float IF graph, quantize it to a profile.

Pipeline order: :mod:`.capture` -> :mod:`.fold` (passes, then grouping) -> :mod:`.quantize`.
This package never imports a back end (``simulators``) or a file writer (``exporters``).
"""
