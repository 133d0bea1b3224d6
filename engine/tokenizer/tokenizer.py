"""Text <-> token ids for a Hugging Face-format model folder.

`hf_tokenizer(model_dir)` reads `tokenizer.json` with the `tokenizers`
library and the special tokens, EOS ids and chat template from the JSON files
that sit beside it (`tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json`, `config.json`, `chat_template.jinja`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.tokenizer.chat_template import ChatTemplateError, render_chat
from engine.utils import read_json_file

__all__ = ["Tokenizer", "hf_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "sep", "cls", "mask")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts an engine needs.

    Build one with `load_tokenizer(model_dir)`. The padding and truncation a
    `tokenizer.json` may carry are switched off: `encode` returns exactly the
    text's ids; ask for truncation with `max_length`.
    """

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: dict[str, str | None] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        name_or_path: str = "",
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._truncating: dict[int, Any] = {}  # max_length -> backend clone
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.model_max_length = model_max_length

        tokens = dict.fromkeys(_SPECIAL_NAMES) | (special_tokens or {})
        self._special_token_ids: dict[str, int] = {}
        for name, text in tokens.items():
            token_id = backend.token_to_id(text) if text is not None else None
            if token_id is not None:
                self._special_token_ids[name] = token_id
        self.special_tokens_map: dict[str, str] = {
            f"{name}_token": text for name, text in tokens.items() if text is not None
        }
        self.bos_token = tokens["bos"]
        self.eos_token = tokens["eos"]
        self.pad_token = tokens["pad"]
        self.unk_token = tokens["unk"]

        extra_eos = list(extra_eos_token_ids)
        if self.eos_token_id is None and extra_eos:
            self._special_token_ids["eos"] = extra_eos[0]
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids: frozenset[int] = frozenset(eos + extra_eos)

        added_special = {
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        }
        self.all_special_ids: frozenset[int] = frozenset(
            added_special | set(self._special_token_ids.values()) | self.eos_token_ids
        )
        self._prepend, self._append = self._special_fixups(add_bos_token, add_eos_token)

    # ---------------------------------------------------------------- ids

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_ids.get("bos")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS id; `eos_token_ids` also holds the model's extra ones."""
        return self._special_token_ids.get("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_ids.get("pad")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_token_ids.get("unk")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (no padding, no truncation)."""
        return self._backend

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ------------------------------------------------------- encode / decode

    def encode(
        self, text: str, add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[int]:
        """Token ids of `text`.

        Args:
            add_special_tokens: add what the tokenizer adds around a sequence
                (BOS, `[CLS]`/`[SEP]`, ...).
            max_length: keep at most this many ids, special tokens included
                (text is cut from the end, as for embedding models' max length).
        """
        return self.encode_batch([text], add_special_tokens, max_length)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        max_length: int | None = None,
    ) -> list[list[int]]:
        """`encode` for many texts at once (tokenized in parallel)."""
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        backend = self._backend if max_length is None else self._truncating_backend(max_length)
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [enc.ids for enc in encodings]
        if add_special_tokens and (self._prepend or self._append):
            ids = [self._prepend + row + self._append for row in ids]
            if max_length is not None:
                ids = [self._cut(row, max_length) for row in ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out when `skip_special_tokens`."""
        if skip_special_tokens:
            special = self.all_special_ids
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        max_chars: int | None = None,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """The prompt of one conversation, rendered as transformers'
        ``apply_chat_template`` renders it.

        The template (`chat_template`, else the model's own) sees ``messages``,
        ``add_generation_prompt``, the special tokens (``bos_token``,
        ``eos_token``, ...) and `template_kwargs`. The rendered text is tokenized
        without adding special tokens: the template writes the ones it wants.

        Returns the token ids, or the text when `tokenize` is False. Raises
        `engine.tokenizer.ChatTemplateError` (a ValueError) when there is
        no template, the template rejects the messages, or it builds more than
        `max_chars` characters (default: `render_chat`'s bound).
        """
        template = chat_template or self.chat_template
        if not template:
            raise ChatTemplateError(
                f"the model {self.name_or_path!r} has no chat template (neither "
                "tokenizer_config.json 'chat_template' nor chat_template.jinja): use a chat "
                "model, or pass a Jinja template (LLM.chat(chat_template=...), "
                "engine chat --chat-template FILE)"
            )
        if max_chars is not None:
            template_kwargs["max_chars"] = max_chars
        text = render_chat(
            template, list(messages),
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map, **template_kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    # ------------------------------------------------------------- helpers

    def _truncating_backend(self, max_length: int) -> Any:
        # A private clone per length: toggling truncation on the shared backend
        # would race with other callers.
        clone = self._truncating.get(max_length)
        if clone is None:
            from tokenizers import Tokenizer as Backend

            clone = Backend.from_str(self._backend.to_str())
            clone.no_padding()
            clone.enable_truncation(max_length)
            self._truncating[max_length] = clone
        return clone

    def _cut(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        keep = max(max_length - len(self._append), 0)
        return ids[:keep] + self._append[: max_length - keep]

    def _special_fixups(
        self, add_bos: bool | None, add_eos: bool | None
    ) -> tuple[list[int], list[int]]:
        """BOS/EOS to add around the backend's own output when tokenizer_config.json
        asks for them (`add_bos_token` / `add_eos_token`) and tokenizer.json's
        post-processor does not add them already."""
        probe = self._backend.encode("a", add_special_tokens=True).ids
        prepend: list[int] = []
        append: list[int] = []
        if add_bos and self.bos_token_id is not None and probe[:1] != [self.bos_token_id]:
            prepend = [self.bos_token_id]
        if add_eos and self.eos_token_id is not None and probe[-1:] != [self.eos_token_id]:
            append = [self.eos_token_id]
        return prepend, append

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)}, pad={self.pad_token_id})"
        )


# ------------------------------------------------------------------ loading


def hf_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face-format model folder.

    Reads `tokenizer.json` (required) and, when present, `tokenizer_config.json`,
    `special_tokens_map.json`, `generation_config.json`, `config.json` (EOS ids,
    an int or a list) and `chat_template.jinja`.

    Raises:
        FileNotFoundError: the folder or its `tokenizer.json` does not exist.
        ValueError: a file exists but cannot be read or parsed (the message
            names it).
    """
    from tokenizers import Tokenizer as Backend

    folder = Path(model_dir)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json; a model folder needs one (save it with "
            "`tokenizer.save_pretrained(folder)` or `tokenizers.Tokenizer.save`)"
        )
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise ValueError(f"{path}: cannot load tokenizer: {exc}") from exc

    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    gen_config = _read_json(folder / "generation_config.json")
    model_config = _read_json(folder / "config.json")

    special = {}
    for name in _SPECIAL_NAMES:
        key = f"{name}_token"
        special[name] = _token_text(tok_config.get(key)) or _token_text(special_map.get(key))

    extra_eos = _id_list(gen_config.get("eos_token_id")) + _id_list(
        model_config.get("eos_token_id")
    )
    return Tokenizer(
        backend,
        special_tokens=special,
        extra_eos_token_ids=extra_eos,
        add_bos_token=tok_config.get("add_bos_token"),
        add_eos_token=tok_config.get("add_eos_token"),
        chat_template=_chat_template(folder, tok_config),
        model_max_length=_model_max_length(tok_config),
        name_or_path=str(folder),
    )


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the (optional) file is absent."""
    return read_json_file(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an
    AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{jinja}: cannot read: {exc}") from exc
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _model_max_length(tok_config: dict[str, Any]) -> int | None:
    value = tok_config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) when the length is unknown
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9:
        return int(value)
    return None
