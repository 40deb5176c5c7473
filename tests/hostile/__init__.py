"""The bad-input corpus, the mutations it is made of and the runner that judges it."""
