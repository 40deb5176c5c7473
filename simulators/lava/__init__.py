"""The Lava back end: ``layout`` (graph -> Lava synapses), ``network`` (the processes),
``processes`` (our Lava processes), ``session`` (Lava's runtime), ``runner`` (``--backend
lava``), ``netx`` (a lava-dl netx file on Lava) and the Python 3.11 import hook (``compat``)."""
