"""Balanced k-means: the pure maths (kmeans), its Ray driver (kmeans_ray), and the stages that fit
and assign (clusters, assignments, onestep); the clustering's stability over seeds."""
