"""Everything that produces spikes from an integer IF graph.

* :mod:`.integer`: the bit-accurate integer simulator (the golden reference;
  ``--backend int``), built on :mod:`csqcfs_deploy.ir.neuron`;
* :mod:`.lava`: the graph as lava-nc processes (``--backend lava``);
* :mod:`.norse`: the graph as a Norse module (``--backend norse``).

Back ends are reached through the registry in :mod:`csqcfs_deploy.run.backends`.
"""
