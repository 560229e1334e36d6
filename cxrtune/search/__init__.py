"""The search service: YAML search spaces, the Ray Tune sweep, reports and promote."""
