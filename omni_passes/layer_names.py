"""Decoder-layer indices from the names models and graphs give them: the one rule.

Module paths (``model.layers.3.mlp.experts``, vLLM prefixes), dynamo's source names
(``L['self'].model.layers[3]``, ``l_self_modules_model_modules_layers_modules_3_``) and node
stack traces all spell a decoder layer as ``layers`` followed by its index, between separators.
"""

from __future__ import annotations

import re

DECODER_LAYER = re.compile(r"(?:^|[._\[\]'])layers[._\[\]']+(\d+)(?:[._\]']|$)")


def decoder_layer_index(name: str) -> int | None:
    """The decoder-layer index ``name`` names (the first one), or None."""
    match = DECODER_LAYER.search(name)
    return int(match.group(1)) if match else None
