"""Pure decision logic: the cores of the server, the client and the scheduler, driven by
messages and the time they are given, returning effects (psd/core/effects.py). No
sockets, no event loop, no clock reads: the daemons and the simulation drive them."""
