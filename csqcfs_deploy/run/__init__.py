"""Running an IF graph: results, the back-end registry, ANN-mode reference, evaluation, verify."""
