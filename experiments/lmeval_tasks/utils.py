# lm-evaluation-harness's own HellaSwag and WinoGrande preprocessing, re-exported for the task files beside this one
# (`!function utils.NAME` loads a file from the task file's folder), so the prompts are lm-eval's by construction
from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
