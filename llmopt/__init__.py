"""llmopt: compress Hugging Face causal LMs and prove what the compression bought.

Python API (the CLI is a thin layer over it)::

    import llmopt
    llmopt.compress("bundled:smollm2", "sparsegpt-50", "out/sgpt50", calib="self:32")
    data = "text:../shared/data/wikitext-2/valid.nounk.txt"
    r = llmopt.evaluate("out/sgpt50", data=data, base="bundled:smollm2")
    llmopt.export("out/sgpt50", to="gguf", output="out/sgpt50.gguf")
    llmopt.export("out/sgpt50", to="onnx", output="out/sgpt50-onnx", quant="int4-rtn")  # ONNX Runtime folder
    llmopt.push("out/sgpt50", "my-user/smollm2-sparsegpt50", dry_run=True)  # files + model card
    llmopt.harness("out/sgpt50", "arc_easy", limit=100)  # lm-evaluation-harness tasks

The functions live in ``llmopt.compression``, ``llmopt.evaluation``, ``llmopt.exporters`` and ``llmopt.hub``; module
names differ from function names so that importing a module never shadows the function (the package
``llmopt.harness`` is itself callable, so it can share the name).
"""

from llmopt.errors import LLMOptError

__version__ = "0.1.0"
__all__ = ["LLMOptError", "compress", "evaluate", "export", "harness", "load_model", "parse_recipe", "push"]

_LAZY = {
    "compress": ("llmopt.compression", "compress"),
    "evaluate": ("llmopt.evaluation", "evaluate"),
    "harness": ("llmopt.harness", None),  # the package itself, callable: llmopt.harness(model, tasks)
    "load_model": ("llmopt.models", "load_model"),
    "parse_recipe": ("llmopt.recipe", "parse_recipe"),
    "push": ("llmopt.hub.push", "push"),
}


def export(model: str, to: str = "gguf", output: str | None = None, **kwargs):
    """Export a model spec (e.g. an llmopt output folder) to another runtime's format, as ``llmopt export``.

    ``to="gguf"``: a llama.cpp file; keyword arguments of :func:`llmopt.exporters.export_gguf` (``type``,
    ``embedding_type``, ``output_type``, ``imatrix``, ``overwrite``). ``to="onnx"``: an ONNX Runtime folder;
    keyword arguments of :func:`llmopt.exporters.export_onnx` (``quant``, ``block_size``, ``accuracy_level``,
    ``overwrite``), the options of ``llmopt export --to onnx``. Returns the exporter's report (a dict).
    """
    if to not in ("gguf", "onnx"):
        raise LLMOptError(f"unknown export target '{to}'; valid targets: gguf, onnx")
    if output is None:
        example = "model.gguf" if to == "gguf" else "model-onnx"
        raise LLMOptError(f"export needs an output path, e.g. output='{example}'")
    from llmopt.exporters import export_gguf, export_onnx

    return (export_gguf if to == "gguf" else export_onnx)(model, output, **kwargs)


def __getattr__(name: str):
    # Lazy: `import llmopt` must not import torch/transformers until needed (fast CLI errors).
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(name)
