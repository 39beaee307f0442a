"""Routing and the MoDE ensemble, the eval stage's report, and the paper's comparison over several
training seeds."""
