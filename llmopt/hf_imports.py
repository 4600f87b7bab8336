"""Import-time settings for transformers, applied before llmopt imports any of its model classes.

Whenever scikit-learn and scipy happen to be installed (lm-eval installs both), transformers imports
them, with pandas, as soon as its model classes are imported: scikit-learn for the dynamic candidate
threshold of assisted generation (``generation.candidate_generator``), scipy for the Hungarian matching
of object-detection losses (``loss.loss_for_object_detection``). llmopt uses neither, and the imports
cost ~140 MiB in every process (measured: 488 → 346 MiB resident after importing ``llmopt.models``),
a fifth of the embedded model's compression budget. Telling transformers that both are absent, before
those imports, removes the cost; those two features would then say that they need the package, in
this process only. Nothing changes if the caller imported transformers' model classes first.
"""

from __future__ import annotations

import sys

if "transformers.generation.candidate_generator" not in sys.modules:
    import transformers.utils.import_utils as _import_utils

    for _flag in ("_sklearn_available", "_scipy_available"):
        if hasattr(_import_utils, _flag):
            setattr(_import_utils, _flag, False)
