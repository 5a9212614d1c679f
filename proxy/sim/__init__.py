"""`omni-proxy sim`: a simulated vLLM instance (OpenAI API, PD protocol, KV events, faults).

The stand-in for a GPU cluster in tests and benchmarks. It shares nothing with the proxy but
the wire formats (``proxy.wire``) and vLLM's block hash (``scheduling.block_hash``).
"""
