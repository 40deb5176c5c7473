"""Conversion: capture a torch model, fold it into a float IF graph, quantize it to a profile.

Pipeline order: :mod:`.capture` -> :mod:`.passes` (the fold passes) -> :mod:`.group`
(neuron groups and projections) -> :mod:`.quantize`; :mod:`.fold` runs the first three.
This package never imports a back end (``simulators``) or a file writer (``exporters``).
"""
