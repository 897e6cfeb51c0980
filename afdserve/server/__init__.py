"""The OpenAI-compatible server: protocol models, an asyncio engine wrapper, routes, metrics.

    protocol.py      pydantic request/response models
    async_engine.py  AsyncEngine: the LLMEngine driven by one step thread
    api.py           build_app(): the FastAPI routes
    chat.py          chat messages -> prompt (the checkpoint's Jinja template, or a plain fallback)
    metrics.py       Prometheus metrics (own registry)
    cli.py           `afdserve serve`
"""
