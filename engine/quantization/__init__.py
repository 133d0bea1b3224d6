"""Quantized weights: the ``quantization`` plugin group and its use at load.

A quantization method is a `QuantizationMethod` subclass published as a
``quantization`` plugin (the built-ins, llama.cpp's block types ``q8_0``,
``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``q5_k``, ``q6_k``, come through
the same manifest path as anyone's). The engine uses one

- for a GGUF file: every tensor whose type a method declares (`gguf_type`)
  stays in its blocks, with no option needed;
- when named: ``LLM(model, quantization=NAME)`` / ``--quantization NAME``
  quantizes the float weights of the linear layers, embedding and LM head at
  load (a GGUF file's tensors of another type are dequantized first);
- ``quantization="none"``: everything in floats (a GGUF file dequantized, as
  the reference the quantized path is compared with).

See docs/quantization.md.
"""

from __future__ import annotations

from engine.quantization.interface import (
    QuantizationMethod,
    QuantizedTensor,
    one_row_per_sequence,
    step_rows,
)
from engine.quantization.layers import (
    QuantizedWeight,
    add_rows,
    allow_quantized_activations,
    finish_quantized_layers,
    quantize_model,
    quantized_layers,
)

NO_QUANTIZATION = "none"

__all__ = [
    "NO_QUANTIZATION",
    "QuantizationMethod",
    "QuantizedTensor",
    "QuantizedWeight",
    "add_rows",
    "allow_quantized_activations",
    "finish_quantized_layers",
    "gguf_method",
    "get_quantization_method",
    "one_row_per_sequence",
    "quantization_method_names",
    "quantize_model",
    "quantized_layers",
    "step_rows",
]

_instances: dict[str, QuantizationMethod] = {}


def _plugins() -> dict[str, object]:
    import registry

    return registry.load_plugins_by_group(registry.QUANTIZATION_PLUGINS)


def quantization_method_names() -> list[str]:
    """The enabled ``quantization`` plugins, by name."""
    return sorted(_plugins())


def get_quantization_method(name: str) -> QuantizationMethod:
    """The method of the ``quantization`` plugin `name`, built once per
    process. Raises ValueError naming the available methods when there is none
    of that name, TypeError when the plugin's value is not a
    `QuantizationMethod` subclass."""
    if name in _instances:
        return _instances[name]
    import registry

    plugins = _plugins()
    if name not in plugins:
        available = ", ".join(sorted(plugins)) or "none"
        raise ValueError(f"quantization {name!r} is not a quantization plugin. Valid options are: "
                         f"{NO_QUANTIZATION}, {available}")
    cls = plugins[name]
    if not (isinstance(cls, type) and issubclass(cls, QuantizationMethod)):
        raise TypeError(f"quantization plugin {name!r}: its value {cls!r} is not a subclass of "
                        "engine.quantization.QuantizationMethod")
    method = registry.call_plugin(registry.QUANTIZATION_PLUGINS, name, cls)
    method.name = name
    registry.record_effect("quantization", name, plugin=name, group=registry.QUANTIZATION_PLUGINS)
    _instances[name] = method
    return method


def gguf_method(tensor_type: str) -> QuantizationMethod | None:
    """The method that keeps GGUF tensors of `tensor_type` (``"Q4_1"``) in
    their blocks: the enabled plugin declaring that `gguf_type` (the first by
    name when several do), or None."""
    plugins = _plugins()
    for name in sorted(plugins):
        cls = plugins[name]
        if isinstance(cls, type) and issubclass(cls, QuantizationMethod) \
                and cls.gguf_type == tensor_type and "gguf" in cls.checkpoint_formats:
            return get_quantization_method(name)
    return None
