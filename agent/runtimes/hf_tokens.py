"""Prompt pieces to token ids with a Hugging Face ``tokenizers.Tokenizer``.

Used by the ONNX adapter (its folder's tokenizer.json) and the MLX adapter (the fast
tokenizer behind mlx-lm's wrapper). Text pieces are encoded by a copy of the tokenizer with
``encode_special_tokens`` on, so a special token's text written in a message stays text
(transformers calls this ``split_special_tokens``); marker pieces are the template's own
and arrive as ids. See `edgefleet.agent.runtimes.prompt` for why and how pieces are made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgefleet.agent.runtimes.prompt import Piece, SpecialToken, SpecialTokens


class TokenizersPieces:
    """One tokenizer's markers, its longest token, and pieces -> ids. The tokenizers library
    is safe to call from any thread."""

    def __init__(self, tokenizer: Any) -> None:
        plain = type(tokenizer).from_str(tokenizer.to_str())
        plain.no_truncation()  # the runtime counts and refuses itself
        plain.no_padding()
        plain.encode_special_tokens = True
        self._plain = plain
        self.specials = SpecialTokens(
            SpecialToken(
                id=int(token_id),
                text=str(added.content),
                control=True,
                lstrip=bool(added.lstrip),
                rstrip=bool(added.rstrip),
            )
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        )
        vocabulary: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
        self.max_token_bytes = max((len(text.encode("utf-8")) for text in vocabulary), default=1)

    def text(self, text: str) -> list[int]:
        """Plain text: no special tokens added, none parsed (non-special added tokens are
        still matched, as the library always does)."""
        if not text:
            return []
        return [int(token) for token in self._plain.encode(text, add_special_tokens=False).ids]

    def ids(self, pieces: Sequence[Piece]) -> list[int]:
        tokens: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                tokens.append(piece)
            else:
                tokens.extend(self.text(piece))
        return tokens
