"""Which layers to compress to sink + recent attention (OmniAttn's layer-pattern search).

- ``objective``: ``CalibrationObjective`` — mean KL divergence of next-token distributions,
  dense model vs the model with sink+recent attention on a candidate pattern, over calibration
  prompts longer than sink + recent (evaluated eagerly with the masked reference: no compile).
- ``search``: strategies behind one interface, chosen by name (``greedy``, ``genetic``), and
  random patterns of the same size for comparison.
"""

from omni_passes.attn_search.objective import CalibrationObjective  # noqa: F401
from omni_passes.attn_search.search import STRATEGIES, SearchResult, make_strategy, random_patterns  # noqa: F401
