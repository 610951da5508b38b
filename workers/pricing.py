"""Token prices. Every cost Frugal reports is computed here from the configured prices."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per input (prompt) token and per output (completion) token."""

    input_per_token: float = 0.0
    output_per_token: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token
