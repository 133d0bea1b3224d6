"""The conformance kit's LoRA check (``platform/NAME::lora_vs_cpu``) on real,
pip-installed platform packages: the example platform (its worker is the
engine's, so it claims LoRA) passes it; a copy whose worker drops the layers'
LoRA hooks after loading the model (its adapters silently do nothing) fails it,
by name, and nothing else is blamed for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_conformance import EXAMPLES, kit_json
from test_example_platform import pip_install_example

CHECK = "platform/acme::lora_vs_cpu"


def break_acme_lora(tmp: Path) -> Path:
    """examples/acme-platform whose worker unhooks LoRA from every layer."""
    source = tmp / "acme-lora-broken"
    shutil.copytree(EXAMPLES / "acme-platform", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    path = source / "src" / "acme_platform" / "worker.py"
    text = path.read_text()
    anchor = "class AcmeWorker(Worker):\n"
    assert anchor in text, "worker.py changed: update break_acme_lora"
    path.write_text(text.replace(anchor, anchor + (
        "    def load_model(self) -> None:\n"
        "        super().load_model()\n"
        "        for module in self.model_runner.model.modules():  # BUG: LoRA unhooked\n"
        "            if getattr(module, 'lora', None) is not None:\n"
        "                module.lora = None\n\n")))
    return source


@pytest.mark.slow
def test_platform_with_lora_passes_and_broken_lora_fails_by_name(tmp_path_factory):
    good = pip_install_example(EXAMPLES / "acme-platform", tmp_path_factory.mktemp("acme"))
    code, results = kit_json("acme", good, "--group", "platform", "-k", "lora or detector")
    outcomes = {r["check"]: r for r in results}
    assert code == 0 and outcomes[CHECK]["outcome"] == "passed", results

    tmp = tmp_path_factory.mktemp("acme-lora-broken")
    broken = pip_install_example(break_acme_lora(tmp), tmp)
    code, results = kit_json("acme", broken, "--group", "platform", "-k", "lora or detector")
    outcomes = {r["check"]: r for r in results}
    assert code == 1, results
    failed = [r["check"] for r in results if r["outcome"] in ("failed", "error")]
    assert failed == [CHECK], results
    message = str(outcomes[CHECK])
    assert "on the adapter" in message and "on 'cpu'" in message, message
