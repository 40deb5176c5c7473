"""The Lava back end: processes, the runner and the Python 3.11 import hook (``compat``)."""
