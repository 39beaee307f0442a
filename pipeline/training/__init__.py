"""The CLIP model and its inputs, the training loop on Ray Train workers, the runs' names and
schedule, and the checkpoints stage that launches them."""
