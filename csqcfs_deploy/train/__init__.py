"""Training: the CS-QCFS activation, the model zoo, datasets, training and checkpoints."""
