"""The ``lmms_eval.models`` entry point: tells lmms-eval where the ``pmod`` model class lives.

Kept apart from the class so that lmms-eval, which loads every entry point at start-up, imports
the model code only when ``--model pmod`` is asked for.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_NAME = "pmod"


def manifest() -> ModelManifest:
    return ModelManifest(
        model_id=MODEL_NAME, simple_class_path="pmod_cli.evaluation.lmms_model.PMoDLmms"
    )
