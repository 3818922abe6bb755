"""What a run carries without using it: heavy imports show up in every run's peak RSS and start-up
time (the benchmark's memory target counts them)."""

import json
import subprocess
import sys


def _modules_loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_training_imports_leave_out_bitsandbytes_and_matplotlib():
    """bitsandbytes costs ~120 MB of resident memory and 2 s to import, matplotlib ~40 MB: only
    --qlora and the confusion-matrix plot need them."""
    code = "import minilora, minilora.finetune, minilora.trainer, minilora.compare, minilora.cli"
    assert _modules_loaded_after(code, ("bitsandbytes", "matplotlib")) == []


def test_building_a_model_to_load_into_imports_no_compiler():
    """The model is built on the meta device and then filled from the checkpoint; torch's meta
    normal_ (an embedding's default init) would import torch._dynamo and sympy (~1 s, ~70 MB)."""
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    code = ("import torch\nfrom minilora.config import ModelConfig\nfrom minilora.model import CausalLM\n"
            f"cfg = ModelConfig.from_hf_dict({config!r})\n"
            "with torch.device('meta'):\n    model = CausalLM(cfg)\n"
            "assert model.model.embed_tokens.weight.is_meta")
    assert _modules_loaded_after(code, ("torch._dynamo", "sympy")) == []


def test_a_model_built_on_cpu_still_draws_its_embeddings():
    import torch

    from minilora.config import ModelConfig
    from minilora.model import CausalLM

    cfg = ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                                    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1})
    torch.manual_seed(0)
    weight = CausalLM(cfg).model.embed_tokens.weight
    assert weight.requires_grad
    weight = weight.detach()
    assert abs(float(weight.std()) - 1.0) < 0.05 and abs(float(weight.mean())) < 0.05


def test_the_lazy_public_names_match_the_type_checking_imports_and_resolve():
    """`minilora/__init__.py` lists its public names twice: the lazy-import table that runs, and a
    TYPE_CHECKING block that only IDEs and type checkers read. They must name the same things, and
    each must resolve to that object, whatever was imported before."""
    import ast
    import importlib
    import pkgutil
    from pathlib import Path

    import minilora

    tree = ast.parse(Path(minilora.__file__).read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    type_checking = {(node.module, alias.name) for node in block.body for alias in node.names}
    lazy = {(module, name) for module, names in minilora._EXPORTS_BY_MODULE.items() for name in names}
    assert type_checking == lazy
    # every submodule loaded first: importing `minilora.generate` (or the CLI `minilora.predict`)
    # binds the submodule on the package, and the public function of that name must still win
    for submodule in pkgutil.iter_modules(minilora.__path__):
        importlib.import_module(f"minilora.{submodule.name}")
    for module, name in sorted(lazy):
        assert getattr(minilora, name) is getattr(importlib.import_module(f"minilora.{module}"), name), name
