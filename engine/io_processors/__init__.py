"""IO processors: plugins that turn request data into prompts to pool and pooling
outputs into responses (docs/reference.md, "Other extension interfaces").

`get_io_processor(config, plugin_name)` picks the plugin; `process_request` (and
`process_request_async` for the server) runs one request through it. Importing
this package does not import torch.
"""

from engine.io_processors.interface import IOProcessor, IOProcessorError
from engine.io_processors.pipeline import process_request, process_request_async
from engine.io_processors.selection import get_io_processor, io_processor_plugin_name

__all__ = [
    "IOProcessor",
    "IOProcessorError",
    "get_io_processor",
    "io_processor_plugin_name",
    "process_request",
    "process_request_async",
]
