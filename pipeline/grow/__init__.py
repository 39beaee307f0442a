"""Adding experts later: which new samples are novel, their own fine clusters and experts, and the
ids of generations added at once."""
