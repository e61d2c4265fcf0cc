"""nightshift's science: pure operations on frames.

Read and classify (``inspect``, ``classify``, ``fitsio``), combine masters (``combine``, ``masters``), calibrate
(``calibrate``), grade (``stars``, ``grade``), register (``register``), stack (``stack``) and picture
(``preview``); plus the camera simulator (``simulate``). No threads, no database, no watching: importable from a
notebook and runnable on a worker of a distributed engine. Never imports ``daemon``.
"""

__version__ = "0.1.0"
