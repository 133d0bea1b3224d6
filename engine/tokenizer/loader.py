"""`load_tokenizer`: the tokenizer of a model, whichever form the model takes."""

from __future__ import annotations

from pathlib import Path

from engine.tokenizer.tokenizer import TOKENIZER_FILE, Tokenizer, hf_tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face-format model folder (see
    `hf_tokenizer`) or of a GGUF model: a ``.gguf`` file, or a folder with one
    and no ``tokenizer.json``.

    Raises:
        FileNotFoundError: the folder or its `tokenizer.json` does not exist.
        ValueError: a file exists but cannot be read or parsed (the message
            names it).
    """
    folder = Path(model_dir)
    if not (folder / TOKENIZER_FILE).is_file():
        # lazy: GGUF reading lives in the model-loading package, which imports
        # torch; a tokenizer.json folder does not need it
        from engine.model_loader.gguf import GGUFFile, find_gguf_file
        from engine.tokenizer.gguf import gguf_tokenizer

        gguf_file = find_gguf_file(folder)
        if gguf_file is not None:  # a GGUF model carries its own tokenizer
            return gguf_tokenizer(GGUFFile.open(gguf_file))
    return hf_tokenizer(folder)
