"""The Hugging Face files beside an ONNX graph: which ``.onnx`` file to serve, the context
length, the special tokens and the chat template.

An ONNX graph carries no tokenizer, no chat template and no context length, so a variant is a
folder (see edgefleet.agent.runtimes.onnx_runtime). Reading it is kept apart from running the
graph: everything here is plain files and Jinja, checked before a session is opened, and every
problem is a RuntimeLoadError naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet.agent.runtimes.base import RuntimeLoadError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

_UNBOUNDED_MODEL_MAX_LENGTH = 10**7  # transformers writes 1e30 when it does not know


def find_model_file(folder: Path) -> Path:
    """``model.onnx``, else the only ``.onnx`` file, in the folder or its ``onnx/`` subfolder."""
    for directory in (folder, folder / "onnx"):
        if (directory / MODEL_FILE).is_file():
            return directory / MODEL_FILE
        candidates = sorted(p for p in directory.glob("*.onnx") if p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise RuntimeLoadError(
                f"{directory} holds several ONNX models ({names}); name the one to serve {MODEL_FILE}"
            )
    raise RuntimeLoadError(f"no ONNX model in {folder} (expected {MODEL_FILE})")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent; a present but unreadable file is a load error."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeLoadError(f"{path.name} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RuntimeLoadError(f"{path.name} is not a JSON object")
    return value


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: object) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """What the model folder says beyond the graph: context, special tokens, chat template."""

    max_positions: int | None
    eos_ids: frozenset[int]
    bos_id: int | None
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... for the chat template
    chat_template: str | None
    config: Mapping[str, Any] = field(default_factory=dict)


def read_folder_config(folder: Path, tokenizer: Any, truncation: int | None) -> FolderConfig:
    """Reads config.json, generation_config.json, tokenizer_config.json and chat_template.jinja."""
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")

    max_positions = next(
        (
            v
            for k in CONTEXT_KEYS
            if isinstance(v := config.get(k), int) and not isinstance(v, bool) and v > 0
        ),
        None,
    )
    model_max = tokenizer_config.get("model_max_length")
    if max_positions is None and isinstance(model_max, int) and 0 < model_max < _UNBOUNDED_MODEL_MAX_LENGTH:
        max_positions = model_max
    if max_positions is None:
        max_positions = truncation

    special: dict[str, str] = {}
    for key, value in tokenizer_config.items():
        if key.endswith("_token") and (text := _token_text(value)) is not None:
            special[key] = text

    def token_id(name: str) -> int | None:
        text = special.get(name)
        found = tokenizer.token_to_id(text) if text else None
        return int(found) if found is not None else None

    eos = _ids(config.get("eos_token_id")) | _ids(generation.get("eos_token_id"))
    if (eos_id := token_id("eos_token")) is not None:
        eos.add(eos_id)
    bos_ids = _ids(config.get("bos_token_id")) or ({b} if (b := token_id("bos_token")) is not None else set())

    template: str | None = None
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        raw = tokenizer_config.get("chat_template")
        if isinstance(raw, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
        template = raw if isinstance(raw, str) and raw.strip() else None
    return FolderConfig(
        max_positions=max_positions,
        eos_ids=frozenset(eos),
        bos_id=min(bos_ids) if bos_ids else None,
        special_tokens=special,
        chat_template=template,
        config=config,
    )


def compile_chat_template(
    template: str, special_tokens: Mapping[str, str]
) -> Callable[[list[dict[str, str]]], str]:
    """The template as transformers renders it: a sandboxed Jinja environment that trims blocks,
    with ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as exc:
        raise RuntimeLoadError("this model's chat template needs the jinja2 package") from exc

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: object, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise RuntimeLoadError(f"the chat template does not compile: {exc}") from exc

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, **special_tokens)

    return render
