"""Hugging Face Hub publishing: :mod:`llmopt.hub.artifacts` reads what an output folder holds,
:mod:`llmopt.hub.card` builds the model card of an output folder,
:mod:`llmopt.hub.push` uploads the folder with it (``llmopt push``, ``llmopt.push``).

Nothing is imported here, so that ``import llmopt.hub.card`` stays light."""
