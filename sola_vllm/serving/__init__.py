"""Serving routed edits inside vLLM 0.32: the plugin's model classes, runtime, ops and APIs."""
