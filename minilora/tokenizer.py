"""The checkpoint's tokenizer (`tokenizers` library) with its special tokens and chat template.

Special-token ids come from the checkpoint's own files (tokenizer_config.json, config.json,
generation_config.json); the chat template is rendered with Jinja2 exactly as the checkpoint
ships it. Padding is always masked by position, never by id, so pad may share eos's id.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """Missing or inconsistent tokenizer files."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from err


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _generation_tag():
    """transformers' `{% generation %} ... {% endgeneration %}` (it marks the assistant's tokens for TRL's
    assistant-only loss): rendered as its body, as transformers does when no token mask is asked for."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationTag


class Tokenizer:
    """Encode / decode text and render chat prompts for one checkpoint folder."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{self.folder}: tokenizer.json not found (minilora reads fast-tokenizer files only)")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for JSON it cannot parse
            raise TokenizerError(f"{path}: cannot be read as a tokenizer ({err}); is the file cut short?") from err
        config = _read_json(self.folder / "tokenizer_config.json")
        model_config = _read_json(self.folder / "config.json")
        model_config = model_config.get("text_config", model_config) if "text_config" in model_config else model_config
        generation = _read_json(self.folder / "generation_config.json")

        self.bos_id = self._special_id(config.get("bos_token"), model_config.get("bos_token_id"))
        eos_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
        eos_default = eos_ids[0] if isinstance(eos_ids, list) else eos_ids
        self.eos_id = self._special_id(config.get("eos_token"), eos_default)
        if self.eos_id is None:
            raise TokenizerError(f"{self.folder}: no eos token in tokenizer_config.json, config.json or generation_config.json")
        self.stop_ids = set(eos_ids if isinstance(eos_ids, list) else [self.eos_id]) | {self.eos_id}
        pad_id = self._special_id(config.get("pad_token"), model_config.get("pad_token_id"))
        self.pad_id = pad_id if pad_id is not None else self.eos_id  # safe: padding is masked by position
        # does encoding add BOS by itself? ask the post-processor rather than trusting a flag
        probe = self.backend.encode("a", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self.chat_template = self._find_chat_template(config)
        # every special token tokenizer_config.json names, for templates that write e.g. {{ pad_token }}
        self.template_tokens = {key: text for key in ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
                                if (text := _token_text(config.get(key))) is not None}

    def _special_id(self, token: Any, fallback_id: Any) -> int | None:
        text = _token_text(token)
        if text is not None:
            token_id = self.backend.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"{self.folder}: special token {text!r} is not in the vocabulary")
            return token_id
        return int(fallback_id) if fallback_id is not None else None

    def _find_chat_template(self, config: dict[str, Any]) -> str | None:
        # transformers' order: a chat_template.jinja file wins over tokenizer_config.json's entry
        jinja_file = self.folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template:
            return template
        return _read_json(self.folder / "chat_template.json").get("chat_template")

    # --- text <-> ids ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as the checkpoint's tokenizer gives them (with BOS when it adds one)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @functools.cached_property
    def newline_ids(self) -> frozenset[int]:
        """Tokens whose text holds a newline (SentencePiece '\\n', byte-level 'Ċ', byte fallback
        <0x0A>): generation stops at them. One scan of the vocabulary per tokenizer."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        candidates = [i for token, i in vocab.items() if "\n" in token or "Ċ" in token or token == "<0x0A>"]
        # 'Ċ' is a newline only in byte-level vocabularies; in Gemma's it is the letter itself
        return frozenset(i for i in candidates if "\n" in self.backend.decode([i], skip_special_tokens=False))

    # --- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's own template. The result already holds BOS when the template
        writes it, so encode it with add_special_tokens=False (BOS exactly once)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.folder}: this checkpoint has no chat template (tokenizer_config.json)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TokenizerError(f"chat template of {self.folder}: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # as transformers renders templates: non-ASCII text stays as it is (jinja's own escapes it)
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        # the environment transformers gives templates: loop controls ({% break %}), the same helpers
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_tag()])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {
            **self.template_tokens,
            "bos_token": self.token(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.token(self.eos_id),
        }
        try:  # tools / documents: None, as transformers passes them when there are none
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **specials
            )
        except TokenizerError:  # the template's own raise_exception
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as err:  # a template's bug: one line
            raise TokenizerError(f"chat template of {self.folder}: {err.__class__.__name__}: {err}") from err

    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in the chat template (Gemma `<end_of_turn>`,
        ChatML `<|im_end|>`), found by rendering a turn: the first special token after the answer,
        else the first token after it; eos when there is no template."""
        if not self.chat_template:
            return self.eos_id
        marker = "\u2063ANSWER\u2063"
        rendered = self.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], add_generation_prompt=False
        )
        if marker not in rendered:
            raise TokenizerError(f"chat template of {self.folder}: an assistant message does not appear verbatim "
                                 "in the rendered turn, so the token that ends the turn cannot be found")
        tail = rendered.split(marker, 1)[1]
        ids = self.backend.encode(tail, add_special_tokens=False).ids
        if not ids:
            return self.eos_id
        # the first special token after the answer: a template that writes the content through
        # `| tojson` closes the JSON string (a plain '"') before it ends the turn
        specials = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        return next((i for i in ids if i in specials), ids[0])
