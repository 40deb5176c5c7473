"""Norse, imported once without its import-time warnings.

norse 1.1 compiles helpers with ``torch.jit.script`` while it is imported, which
torch >= 2.5 deprecates with a FutureWarning (once per process): noise on the
user's terminal and on a one-line error. This module imports ``norse.torch`` with
that warning (from ``torch.jit``, of that category) ignored; the package imports
it first, so that the modules below find norse already imported.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    import norse.torch  # noqa: F401
