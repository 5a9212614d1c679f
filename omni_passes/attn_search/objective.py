"""The calibration objective of the pattern search.

For a pattern (decoder-layer indices to compress), the objective is the mean over calibration
prompts and over positions p >= sink + recent of KL(P_dense(· | x_<=p) || P_pattern(· | x_<=p)),
the next-token distributions of the dense model and of the same model with sink+recent
attention on the pattern's layers. Positions before sink + recent are left out: there every
query sees all of its keys, so both models agree and would only dilute the average.

The compressed model is the masked reference (``omni_passes.kvcache.attention``): dense
attention with the sink+recent mask, eager. It computes exactly what the pass produces (the
whole-model tests check that), without a compile per candidate.
"""

from __future__ import annotations

from typing import Iterable

import torch

from omni_passes.kvcache.attention import masked_reference


class CalibrationObjective:
    def __init__(self, model: torch.nn.Module, prompts: Iterable[torch.Tensor], sink: int, recent: int,
                 batch_size: int = 8):
        """prompts: 1-D token-id tensors, each longer than sink + recent."""
        self.model = model
        self.sink, self.recent = sink, recent
        self.batch_size = batch_size
        self.prompts = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
        if not self.prompts:
            raise ValueError("calibration objective: no prompts")
        short = [i for i, p in enumerate(self.prompts) if p.numel() <= sink + recent]
        if short:
            raise ValueError(f"calibration prompts {short} have <= sink + recent = {sink + recent} tokens; "
                             "the objective needs longer prompts to see any compression")
        self.device = next(model.parameters()).device
        self.evaluations = 0
        self._cache: dict[tuple[int, ...], float] = {}
        self._dense = [self._log_probs(batch) for batch in self._batches()]

    def _batches(self) -> list[torch.Tensor]:
        """Prompts grouped by length (equal lengths stack without padding)."""
        by_length: dict[int, list[torch.Tensor]] = {}
        for prompt in self.prompts:
            by_length.setdefault(prompt.numel(), []).append(prompt)
        batches = []
        for _, group in sorted(by_length.items()):
            for start in range(0, len(group), self.batch_size):
                batches.append(torch.stack(group[start:start + self.batch_size]).to(self.device))
        return batches

    @torch.no_grad()
    def _log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, T - (sink + recent), V] float32 log-probabilities at the positions scored."""
        logits = self.model(batch).logits[:, self.sink + self.recent:]
        return torch.log_softmax(logits.float(), dim=-1)

    def __call__(self, pattern: Iterable[int]) -> float:
        key = tuple(sorted(set(pattern)))
        if key not in self._cache:
            self._cache[key] = self._evaluate(key)
        return self._cache[key]

    def _evaluate(self, pattern: tuple[int, ...]) -> float:
        if not pattern:
            return 0.0
        self.evaluations += 1
        total, count = 0.0, 0
        with masked_reference(self.model, self.sink, self.recent, list(pattern)):
            for batch, dense in zip(self._batches(), self._dense):
                sparse = self._log_probs(batch)
                kl = (dense.exp() * (dense - sparse)).sum(-1)  # [B, positions]
                total += float(kl.sum())
                count += kl.numel()
        return total / count
