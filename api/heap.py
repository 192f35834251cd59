"""The served process's garbage collector, tuned for many small requests.

A request allocates thousands of short-lived objects; with CPython's defaults a collection
of the young generation runs every 700 net allocations, and every so often a full
collection walks every object of the process (the schema, the ORM, the libraries: about
130,000 objects), which the spend benchmark measured at about a tenth of the process's
time. Once the app is built, ``settle_heap`` moves what exists then (what lives as long
as the process) out of the collector's sight (``gc.freeze``) and lets the young
generation grow larger before it is collected. Cycles are still collected; memory held by
the frozen objects is never scanned again.
"""

from __future__ import annotations

import gc

#: Net allocations between collections of the young generation (CPython's default: 700).
GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once the long-lived objects exist (the ASGI entry point does, at import)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
