"""llmopt: compress Hugging Face causal LMs and prove what the compression bought.

Python API (the CLI is a thin layer over it)::

    import llmopt
    llmopt.compress("bundled:smollm2", "configs/sparsegpt-50.yaml", "out/sgpt50", calib="self:32")
    data = "text:../shared/data/wikitext-2/valid.nounk.txt"
    r = llmopt.evaluate("out/sgpt50", data=data, base="bundled:smollm2")
"""

from llmopt.errors import LLMOptError

__version__ = "0.1.0"
__all__ = ["LLMOptError", "compress", "evaluate", "load_model", "parse_recipe"]


def __getattr__(name: str):
    # Lazy: importing llmopt must not import torch/transformers until needed (fast CLI errors).
    if name == "compress":
        from llmopt.compress import compress

        return compress
    if name == "evaluate":
        from llmopt.evaluate import evaluate

        return evaluate
    if name == "load_model":
        from llmopt.models import load_model

        return load_model
    if name == "parse_recipe":
        from llmopt.recipe import parse_recipe

        return parse_recipe
    raise AttributeError(name)
