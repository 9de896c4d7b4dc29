"""The BLIP-2 server: the engine (service/engine/, service/engine/gallery/) and its HTTP face (service/api/);
docs/ARCHITECTURE.md.

Torch's OpenMP threads (libgomp) spin after each parallel operation before they sleep: 300,000 spins by
default, milliseconds on these CPUs. In a server that spinning takes the cores other threads need between two
operations: LanceDB's readers in a gallery search (100,000 images: 182 -> 53 ms while another process loads
the machine, 55 -> 32 ms quiet), the request threads. 10,000 spins still keep them awake across the
back-to-back operations of a forward pass. libgomp reads it when it loads, so it is set here, before anything
imports torch; a value in the environment wins (docs/DEPLOY.md).
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
