"""Reports: synaptic operations and MACs (:mod:`.sops`) and energy estimates (:mod:`.energy`)."""
