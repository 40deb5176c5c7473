"""Exporters and back ends: IF graph -> NIR, NIR -> Lava, NIR -> Norse, netx."""
