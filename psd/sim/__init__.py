"""A deterministic simulation of a whole cluster: the real cores (``psd.core``) over a
simulated network and clock driven by a seed. It explores interleavings, partitions,
stalls and crashes that the real processes meet only by luck, and checks the invariants
on every step. ``simulate(seed)``; ``scripts/sim_soak.py`` runs many seeds."""
from psd.sim.run import Outcome, Settings, settings_for, simulate

__all__ = ["simulate", "settings_for", "Settings", "Outcome"]
