"""`lmpipe serve`: the exported model over HTTP (app), micro-batching, limits and token, metrics, the engine."""
