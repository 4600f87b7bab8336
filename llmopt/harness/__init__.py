"""lm-evaluation-harness on llmopt's backends: ``llmopt.harness(model, tasks, ...)`` and ``llmopt harness``.

=================  ===========================================================================
file               job
=================  ===========================================================================
``run.py``         :func:`harness`: arguments, tasks, the LM, ``lm_eval.simple_evaluate``, results
``tasks.py``       task names / ``--include-path`` → lm-eval tasks; unknown names, Hub data offline
``torch_lm.py``    lm-eval's ``HFLM`` around a model :func:`llmopt.load_model` loaded
``backend_lm.py``  an lm-eval ``LM`` over any llmopt backend's logits, following HFLM's token rules
``llamacpp_lm.py`` GGUF files in process on llama-cpp-python (``logits_all``), greedy on its KV cache
``onnx_lm.py``     ONNX folders (``llmopt export --to onnx``) on ONNX Runtime
=================  ===========================================================================

All three see the same token ids for the same text (the tokenizer's own BOS rule, HFLM's prefix token,
HFLM's rolling windows), so their per-document log-likelihoods differ only by their runtimes' logits.
"""

import sys
import types

from llmopt.harness.run import format_harness, harness

__all__ = ["format_harness", "harness"]


class _CallableModule(types.ModuleType):
    """``llmopt.harness`` is this package once it is imported (Python sets the parent's attribute), which
    would shadow the function ``llmopt.harness(...)``; calling the package calls the function instead
    (a ``ModuleType`` subclass as ``__class__``, the customisation the Python data model documents)."""

    def __call__(self, *args, **kwargs):
        return harness(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
