"""Reports: synaptic operations, MACs and energy estimates."""
