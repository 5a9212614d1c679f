"""Wire formats shared by the proxy and the simulated engine (the only code they share).

* :mod:`proxy.wire.openai`    OpenAI request checks, error bodies, SSE framing
* :mod:`proxy.wire.kv_events` vLLM's KV event messages (ZMQ multipart, msgpack)
* :mod:`proxy.wire.text`      the character-block tokenizer both use without a real tokenizer
* :mod:`proxy.wire.tokens`    a request's prompt as token ids, as vLLM computes them
"""
