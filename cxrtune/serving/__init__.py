"""The Ray Serve application (an ingress and two batched model stages) and its viewer page."""
