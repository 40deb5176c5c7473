"""NIR exchange (SPEC section 6): integer IF graph <-> ``nir.NIRGraph`` <-> ``.nir`` file.

The package, by concern: :mod:`.flavors` (flavours, exactness notes, the portable
threshold rule, the default's fallback), :mod:`.readers` (measured reader facts),
:mod:`.writer` (IF graph -> NIR, files), :mod:`.reader` (NIR -> IF graph, files),
:mod:`.projections` (one synapse chain -> one projection),
:mod:`.semantics` (chains, order, plain-NIR semantics), :mod:`.validate` (node types,
acyclicity, metadata and value checks), :mod:`.groups` (grouped convs stored dense),
:mod:`.float_import` and :mod:`.float_rewrite` (a third-party float NIR graph -> the
float IF graph, quantized like a checkpoint; ``--source-semantics``).
What the command line prints lives in :mod:`csqcfs_deploy.cli.nir_text`.

Mapping (one NIR node per layer, one chain of NIR nodes per projection)::

    InputLayer           -> nir.Input   (shape = the layer's shape)
    IFLayer              -> nir.IF      (r = 1, v_threshold/v_reset of the layer's shape)
    ReadoutLayer         -> nir.Output  (its per-step input, summed over the counted steps,
                                         is the readout membrane)
    projection p         -> [nir.SumPool2d]  p.pool, if any       (node "<p>_pool")
                            [nir.Flatten]    start_dim=0, a dense projection from (C, H, W)
                                                                  (node "<p>_flatten")
                            nir.Conv2d       conv (a grouped conv stored dense, block
                                             diagonal), or identity on (C, H, W) as a
                                             1x1 conv with a diagonal weight  (node "<p>")
                            nir.Affine       dense, or identity on (F,) as a diagonal matrix
    residual structure   -> two (or more) edges into the same IF node (readers sum them)

Units: NIR carries membrane units. A NIR weight is the stored integer weight
shifted left by the profile's ``act_shift`` (loihi2: x 64), so that
``v += W_nir (*) s + b`` is the membrane update; the layer's bias is the
``bias`` of its first incoming projection's Conv2d/Affine (zeros on the
others), so it is added every step as in the IF graph.

Flavours (:mod:`.flavors`; ``export --target nir`` picks ``portable`` by default):

* ``portable`` (default): for readers that ignore metadata (NIR semantics: ``v``
  starts at 0, ``v += I``, spike when ``v > v_threshold``, ``v <- v_reset = 0``).
  Per-channel thresholds (a per-neuron ``v_threshold`` array, which norse and sinabs
  read); ``v_threshold = v_th - v_init + 1/2`` (``- 1/2`` where the profile fires on
  ``v >= v_th``): a half-integer, so that readers comparing with ``>`` and with
  ``>=`` agree on integer membranes; float32 arrays (float64 if a value is not
  exact in float32). A reader then spikes exactly as the IF graph at ``T = 1``
  without pre-simulation, as long as no value wraps or saturates (loihi2's
  24-bit current and voltage). The metadata still holds the originals, so our
  reader restores the IF graph exactly from a portable file too. Refused (naming
  the projection) for a weight exponent or a padded sum pool; the default then
  falls back to ``native`` with a ``warning:`` line.
* ``portable-uniform``: ``portable`` with one threshold per layer (a graph
  quantized with ``--per-layer-thresholds``), for snnTorch and spikingjelly.
* ``native``: int64 arrays, per-channel thresholds, ``v_threshold`` = the IF
  graph's ``v_th`` (the amount the soft reset subtracts). Reset by subtraction,
  the initial membrane, the comparison, real-unit scales, the profile and the
  input encoding live in ``metadata`` (see README.md, "NIR export and import").
  Exact at every T, P and schedule for a reader that applies the metadata;
  :func:`nir_to_graph` restores the IF graph exactly. In the file its IF nodes
  have the type ``CsqcfsIF`` (not a NIR type), so that ``nir.read`` and every
  reader built on it refuse the file instead of running it with plain semantics;
  in memory (:func:`graph_to_nir`) they are ``nir.IF``.

Which third-party readers were measured exact on which flavour, with which
settings: :mod:`.readers` (printed by ``export``).

Reading a NIR graph *without* our metadata (a plain NIR file, or a portable
file whose metadata a tool dropped) follows NIR's own IF semantics: it becomes
an ``int16`` graph (``v >= v_th`` with ``v_th = floor(v_threshold) + 1``, hard
reset ``reset="zero"``, ``v_init = 0``, real scales 1); weights and biases must
be integer-valued.
"""

from csqcfs_deploy.exporters.nir.flavors import (
    DEFAULT_FLAVOR,
    FLAVORS,
    FOREIGN_PROFILE,
    NATIVE_EXACTNESS,
    NIR_FORMAT,
    NIR_FORMAT_VERSION,
    PORTABLE_EXACTNESS,
    PORTABLE_FLAVORS,
    PORTABLE_UNIFORM_EXACTNESS,
    SCHEDULE_HINT,
)
from csqcfs_deploy.exporters.nir.reader import nir_to_graph, read_nir_graph
from csqcfs_deploy.exporters.nir.writer import NirExport, export_nir, graph_to_nir, write_nir_graph

__all__ = [
    "DEFAULT_FLAVOR",
    "FLAVORS",
    "FOREIGN_PROFILE",
    "NATIVE_EXACTNESS",
    "NIR_FORMAT",
    "NIR_FORMAT_VERSION",
    "PORTABLE_EXACTNESS",
    "PORTABLE_FLAVORS",
    "PORTABLE_UNIFORM_EXACTNESS",
    "SCHEDULE_HINT",
    "NirExport",
    "export_nir",
    "graph_to_nir",
    "nir_to_graph",
    "read_nir_graph",
    "write_nir_graph",
]
