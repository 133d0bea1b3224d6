"""Example general plugin: registers a new model architecture, lazily."""


def register() -> None:
    """Runs in every engine process; re-entrant (re-registering replaces)."""
    from engine import ModelRegistry

    ModelRegistry.register_model("MyLlamaForCausalLM", "my_model_plugin.model:MyLlamaForCausalLM")
