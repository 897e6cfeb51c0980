"""Serving engine: requests, paged KV block manager, scheduler and the engine loop."""
