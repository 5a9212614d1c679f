"""``omni-proxy serve``: the OpenAI-compatible proxy that applies ``scheduling`` to traffic."""
