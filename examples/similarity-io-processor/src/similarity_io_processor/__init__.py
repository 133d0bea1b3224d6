"""An IO-processor plugin for a sentence-embedding model (e.g. all-MiniLM-L6-v2):
text in, the top-k most similar sentences of a small built-in corpus out.

    llm = LLM("path/to/all-MiniLM-L6-v2", io_processor_plugin="similarity")
    llm.encode({"query": "a cat on a mat", "top_k": 3})
    # {"query": "a cat on a mat", "results": [{"text": ..., "score": 0.71}, ...]}
"""

from __future__ import annotations


def register() -> str:
    """The io_processor plugin's value: the processor class's qualified name."""
    return "similarity_io_processor.processor.SimilarityIOProcessor"
