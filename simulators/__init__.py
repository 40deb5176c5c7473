"""The bit-accurate integer simulator of the IF graph (the golden reference).

``neurons``: the pure per-step neuron rules; ``integer``: the batched
simulation of a whole graph under either schedule; ``backend``: the same as a
``--backend int`` runner.
"""
