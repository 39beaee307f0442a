"""Serving the routed experts over HTTP with Ray Serve: one application per expert, a router that
routes, mixes and deploys the experts a run gains, and the builder that `serve deploy` imports."""
