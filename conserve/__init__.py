"""ConServe's shared kernel: what every layer (tiers, placement, energy, orchestrator, api) may import.

Holds only leaf modules with no project imports: the error base (:mod:`conserve.errors`). Each capability
defines its own error subclasses in its own package (``tiers.errors``, ``placement.errors``,
``energy.errors``, ``orchestrator.errors``).
"""
