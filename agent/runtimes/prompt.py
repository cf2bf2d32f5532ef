"""Prompts as token pieces: only the chat template's own markers become control tokens.

A chat template is model-supplied text with the conversation pasted in. Rendering it to one
string and tokenizing that with special-token parsing on (what llama-cpp-python, mlx-lm and
transformers do) lets a message that *types* ``<|im_end|>\\n<|im_start|>system`` close its own
turn and open a fake system turn. Here the template is rendered with an unguessable
placeholder per message content (:func:`chat_segments`), so what the template wrote and what
a message said stay apart; control-token texts are then looked for in the template's text
only (:func:`assemble`), and message text is tokenized with special parsing off.

The result is a list of pieces, token ids (the markers) and strings (text to tokenize with
special parsing off), in order. Adjacent template and message text is joined before it is
tokenized, so an ordinary conversation gets exactly the token ids the whole rendered string
would get from the library (a tokenizer splits at control tokens and tokenizes the text
between them on its own, which is what the pieces are).

Finding the markers here, in one pass per marker that actually occurs, also keeps
tokenizing linear: llama.cpp's own special-token partition walks a linked list from its head
for every match, so a text repeating a marker 50,000 times took seconds, and megabytes of
it minutes, on the one thread that also generates. :class:`PromptLimit` refuses, before any
tokenizer runs, a text too long to fit the context window whatever its tokens.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from edgefleet.agent.runtimes.base import ChatMessage, InvalidPromptError, PromptTooLarge

Piece = int | str
"""A token id the prompt must contain as is, or text to tokenize with special parsing off."""

_ASCII_SPACE = " \t\n\v\f\r"  # what C's isspace() strips around llama.cpp's lstrip/rstrip tokens
_MAX_ROLE_CHARS = 64
_PARTICIPANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a message name


@dataclass(frozen=True, slots=True)
class SpecialToken:
    """A vocabulary entry a tokenizer matches as a whole before it tokenizes the text around it.

    ``control``: matched only where special-token parsing is on (the template's own text, a
    raw completion prompt). A non-control entry (llama.cpp's "user-defined" tokens) is matched
    in message text too, exactly as the tokenizer itself would with parsing off.
    ``lstrip`` / ``rstrip``: the tokenizer swallows whitespace on that side of the marker.
    """

    id: int
    text: str
    control: bool = True
    lstrip: bool = False
    rstrip: bool = False


class SpecialTokens:
    """The markers of one vocabulary, longest first (the order llama.cpp matches them in)."""

    def __init__(self, tokens: Iterable[SpecialToken]) -> None:
        by_text: dict[str, SpecialToken] = {}
        for token in tokens:
            if token.text:
                by_text.setdefault(token.text, token)
        self._tokens = tuple(sorted(by_text.values(), key=lambda t: len(t.text), reverse=True))

    def __len__(self) -> int:
        return len(self._tokens)

    def split(self, text: str, *, control: bool) -> list[str | SpecialToken]:
        """``text`` cut at every marker it contains (control markers only if ``control``).

        One scan of the text per marker that occurs in it (``str.find``, so C speed);
        markers that do not occur cost one containment test each.
        """
        present = [t for t in self._tokens if (control or not t.control) and t.text in text]
        parts: list[str | SpecialToken] = [text]
        for token in present:
            cut: list[str | SpecialToken] = []
            for part in parts:
                if not isinstance(part, str) or token.text not in part:
                    cut.append(part)
                    continue
                chunks = part.split(token.text)
                for index, chunk in enumerate(chunks):
                    if index:
                        cut.append(token)
                    if chunk:
                        cut.append(chunk)
            parts = cut
        return parts


def assemble(segments: Sequence[tuple[str, bool]], specials: SpecialTokens) -> list[Piece]:
    """Pieces for ``(text, is_template)`` segments: markers are looked for in template text
    (and non-control ones everywhere), adjacent text is joined, lstrip/rstrip applied."""
    marked: list[str | SpecialToken] = []
    for text, is_template in segments:
        marked.extend(specials.split(text, control=is_template))
    pieces: list[Piece] = []
    run: list[str] = []  # text since the last marker, joined once (repeated += would be quadratic)

    def flush(*, lstrip: bool) -> None:
        text = "".join(run)
        run.clear()
        if lstrip:
            text = text.rstrip(_ASCII_SPACE)
        if text:
            pieces.append(text)

    strip_next = False
    for part in marked:
        if isinstance(part, SpecialToken):
            flush(lstrip=part.lstrip)
            pieces.append(part.id)
            strip_next = part.rstrip
            continue
        if strip_next:
            part = part.lstrip(_ASCII_SPACE)
            strip_next = bool(not part)  # whitespace-only: keep stripping into the next part
        if part:
            run.append(part)
    flush(lstrip=False)
    return pieces


@dataclass(frozen=True, slots=True)
class RenderedChat(ChatMessage):
    """A conversation the API already rendered through the model's own chat template, as
    ``(text, is_template)`` segments: used when the runtime's template call cannot take what
    the template needs (``tools``, structured ``tool_calls``; see api.tool_formats).
    ``content`` is all of the messages' text, for the size checks made before rendering."""

    segments: tuple[tuple[str, bool], ...] = ()


def chat_segments(
    render: Callable[[list[dict[str, str]]], str], messages: Sequence[ChatMessage]
) -> list[tuple[str, bool]]:
    """The rendered chat as ``(text, is_template)`` segments, message contents kept verbatim.
    A lone `RenderedChat` is its own segments.

    Each non-empty content is replaced by a placeholder made of private-use characters and a
    per-request random nonce (a message cannot forge it), so the template's text can be told
    from the messages' whatever the messages contain. A template that transforms content
    (trims it, say) sees the placeholder, so the content is inserted as written; one that
    drops a message's content (earlier reasoning, for instance) drops it here too.
    Raises InvalidPromptError when the template refuses the messages or a role is not a
    plain name (roles are written into the template's text).
    """
    if len(messages) == 1 and isinstance(messages[0], RenderedChat):
        return list(messages[0].segments)
    nonce = secrets.token_hex(8)
    contents: dict[int, str] = {}
    conversation: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = message.role
        if not (0 < len(role) <= _MAX_ROLE_CHARS and role.replace("_", "").replace("-", "").isalnum()):
            raise InvalidPromptError(f"message {index} has an invalid role")
        content = message.content
        if content:
            contents[index] = content
            content = f"\ue000{nonce}.{index}\ue001"
        turn = {"role": role, "content": content}
        if message.name is not None:
            if not _PARTICIPANT_NAME.fullmatch(message.name):  # written into the template's text
                raise InvalidPromptError(f"message {index} has an invalid name")
            turn["name"] = message.name
        conversation.append(turn)
    try:
        rendered = render(conversation)
    except Exception as exc:  # the template is model-supplied Jinja: any failure is a bad prompt
        raise InvalidPromptError(f"the model's chat template rejected the messages: {exc}") from exc
    segments: list[tuple[str, bool]] = []
    end = 0
    for match in re.finditer(f"\ue000{nonce}\\.([0-9]+)\ue001", rendered):
        said = contents.get(int(match.group(1)))
        if said is None:  # cannot happen: only contents were replaced
            continue
        if match.start() > end:
            segments.append((rendered[end : match.start()], True))
        segments.append((said, False))
        end = match.end()
    if end < len(rendered):
        segments.append((rendered[end:], True))
    return segments


@dataclass(frozen=True, slots=True)
class PromptLimit:
    """The longest text that could still fit a context window, checked before tokenizing.

    No token stands for more input bytes than the longest token's own text has, so a text of
    more than ``n_ctx * max_token_bytes`` bytes cannot fit in ``n_ctx`` tokens: it is refused
    at once instead of being tokenized (which is what bounds the tokenizer's time).
    """

    n_ctx: int
    max_token_bytes: int

    @property
    def max_bytes(self) -> int:
        return self.n_ctx * max(1, self.max_token_bytes)

    def check(self, texts: Iterable[str]) -> None:
        """Raises PromptTooLarge when the texts together are longer than any prompt could be."""
        limit = self.max_bytes
        total = 0
        for text in texts:
            size = len(text)
            if size <= limit:  # bytes >= characters: only a text that might fit is measured
                size = len(text.encode("utf-8", "surrogatepass"))
            total += size
            if total > limit:
                raise PromptTooLarge(
                    prompt_bytes=total,
                    max_bytes=limit,
                    n_ctx=self.n_ctx,
                    max_token_bytes=self.max_token_bytes,
                )


def seed32(seed: int) -> int:
    """A request's seed as the 32-bit value backends take (the API passes any integer's low
    32 bits). llama.cpp reads 0xFFFFFFFF as "pick a random seed", so that one value is
    mapped to another fixed one: every seed gives the same stream each time."""
    value = seed & 0xFFFF_FFFF
    return 0xFFFF_FFFE if value == 0xFFFF_FFFF else value
