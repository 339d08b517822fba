"""The engine seam: the server talks to any inference backend only through `runtime.engine.base.Engine`."""

import os

OPENMP_SPIN_COUNT = "1000"
"""How long llama.cpp's CPU threads (OpenMP) spin at a barrier before they sleep (libgomp's default is 300,000).

A graph step passes hundreds of barriers. When the host is busier than its cores (the HTTP thread, the audit writer,
other services), a thread that spins for its partner steals the very CPU the partner needs to arrive, and a step
takes a scheduler quantum per barrier: throughput collapses tenfold. Spinning briefly keeps barriers fast on an idle
host and lets a busy one schedule the partner. libgomp reads it once, when llama.cpp is loaded, so it is set when
this package is first imported (`sealbox serve` does so before anything loads llama.cpp); an operator's own
GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
"""

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
