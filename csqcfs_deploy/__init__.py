"""csqcfs-deploy: take a trained CS-QCFS network to integrate-and-fire hardware.

Pipeline: capture (``capture``) -> fold (``folding``) -> quantize to a hardware
profile (``quantize``, ``profiles``) -> the IF graph (``graph``) -> simulate
(``csqcfs_deploy.simulators``) and export (``csqcfs_deploy.exporters``).
The semantics every part agrees on are in SPEC.md (shipped as docs/SPEC.md).
"""

__version__ = "0.1.0"
