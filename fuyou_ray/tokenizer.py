"""Tokenizers from a local model directory (no hub access), and the byte-level default.

`load_tokenizer(None)` is UTF-8 bytes (vocab 256, no special tokens): the embedded demo. A directory
loads its `tokenizer.json` with the `tokenizers` library - the file every current Llama / Mistral / Qwen2 /
GPT-2 checkpoint ships - and its special tokens and chat template from `tokenizer_config.json` (or
`chat_template.jinja`), with EOS falling back to generation_config.json / config.json. Chat templates are
rendered with a sandboxed Jinja environment set up as transformers sets it up (trim_blocks,
lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`), so the text equals
`apply_chat_template(..., tokenize=False)` without importing transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol


class TokenizerError(ValueError):
    """A tokenizer directory is missing files, or a chat template cannot be rendered."""


class TextTokenizer(Protocol):
    """What data preparation and generation need from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, no chat template."""

    vocab_size = 256
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    fingerprint = "bytes-v1"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A model's own tokenizer from its local directory (tokenizer.json + tokenizer_config.json).

    Immutable after loading. `encode(text)` applies the tokenizer's post-processor (e.g. Llama 3's BOS)
    unless add_special_tokens=False; `encode_with_offsets` gives each token's character span, which is
    how chat data finds the assistant's tokens.
    """

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{self.directory}: no tokenizer.json (data.tokenizer must name a directory holding the "
                "model's fast tokenizer; convert a slow one once with transformers: AutoTokenizer."
                "from_pretrained(dir).save_pretrained(dir))"
            )
        self._tok = Tokenizer.from_file(str(path))
        config = _read_json(self.directory / "tokenizer_config.json")
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        model_cfg = {
            **_read_json(self.directory / "config.json"),
            **_read_json(self.directory / "generation_config.json"),
        }
        self.bos_id = self._special_id("bos_token", model_cfg.get("bos_token_id"))
        self.eos_id = self._special_id("eos_token", model_cfg.get("eos_token_id"))
        self.pad_id = self._special_id("pad_token", model_cfg.get("pad_token_id"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = self._chat_template(config)
        digest = hashlib.sha256(path.read_bytes())
        digest.update(json.dumps(self.special_tokens, sort_keys=True).encode())
        digest.update((self.chat_template or "").encode())
        self.fingerprint = digest.hexdigest()

    def _special_id(self, key: str, fallback: Any) -> int | None:
        text = self.special_tokens.get(key)
        if text is not None:
            token_id = self._tok.token_to_id(text)
            if token_id is not None:
                return int(token_id)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return int(fallback) if isinstance(fallback, int) else None

    def _chat_template(self, config: Mapping[str, Any]) -> str | None:
        jinja = self.directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template") or _read_json(self.directory / "chat_template.json").get(
            "chat_template"
        )
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each token's [start, end) character span."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages`, as transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.directory}: the tokenizer has no chat template, so `messages` data "
                "cannot be rendered; use prompt/completion records instead"
            )
        try:
            return _compile(self.chat_template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except Exception as exc:  # jinja raises many types; name the template and the cause
            raise TokenizerError(f"{self.directory}: chat template failed: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text so): rendered as is."""

        tags = {"generation"}  # noqa: RUF012 (jinja's own convention)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load_tokenizer(directory: str | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer in `directory`, or UTF-8 bytes when it is None."""
    return ByteTokenizer() if directory is None else HFTokenizer(directory)
