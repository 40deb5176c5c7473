"""csqcfs-deploy: take a trained CS-QCFS network to integrate-and-fire hardware.

The pipeline, one sub-package per stage:

* :mod:`csqcfs_deploy.train`: the CS-QCFS activation, the model zoo, datasets,
  training and checkpoints;
* :mod:`csqcfs_deploy.convert`: capture (torch.fx) -> fold passes -> quantize to a
  hardware profile;
* :mod:`csqcfs_deploy.ir`: the captured ANN graph and the IF graph, their file
  format, the profiles' arithmetic, the run schedules and the one specification of
  the neuron rule (:mod:`csqcfs_deploy.ir.neuron`);
* :mod:`csqcfs_deploy.run`: results, the back-end registry, the ANN-mode reference,
  evaluation and verification; :mod:`csqcfs_deploy.report`: SOPs and energy;
* :mod:`csqcfs_deploy.simulators`: everything that produces spikes (the integer
  simulator, Lava, Norse); :mod:`csqcfs_deploy.exporters`: file writers and
  readers (NIR, lava-dl netx); :mod:`csqcfs_deploy.cli`: the command line.

The semantics every part agrees on are in SPEC.md (shipped as docs/SPEC.md).
"""

__version__ = "0.1.0"
