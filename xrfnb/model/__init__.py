"""Model (model room): the network, the pigment model and its identification, the simulated training data
and training.

Imports the rooms below it: core, io, physics, fitting.

Importing this room sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: torch loads its
OpenMP runtime when it is first imported (here, for xrfnb) and reads the variable then. Passive OpenMP
threads sleep while they wait for work instead of spinning for about 300,000 turns; on a machine whose
cores are shared (the thread that decodes the next block of a scan while the network runs, other
processes) spinning threads take the CPU from the work they wait for, which made whole-scan mapping two to
three times slower on the two-core project machine under load. The results are the same either way.

It also keeps the memory of freed temporary arrays for reuse instead of returning it to the kernel after
every batch (:mod:`xrfnb.model.allocator`: glibc's thresholds; the first whole-scan map of a process ran
about a third slower without it), unless the environment sets the allocator itself.
"""

import os

from .allocator import keep_freed_memory

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
keep_freed_memory()
