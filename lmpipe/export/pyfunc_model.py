"""The MLflow pyfunc model of an lmpipe export, logged as code (MLflow runs this file on load).

Logged by `lmpipe.export.export.publish` with:
- artifact `hf`: the exported transformers folder (models/export/hf: safetensors, config with
  id2label, tokenizer, lmpipe.json). The served model runs it with torch, the reference
  backend whose predictions the evaluate stage scored; the ONNX files stay in models/export
  for runtimes outside MLflow.
- code: the lmpipe package, so the text is encoded by the same `encode_texts` as in training.

Input: a DataFrame with a `text` column (also a list of strings or a Series).
Output: a DataFrame with `label`, `score` (probability of that label) and `prob_<label>` for
every label. Serving accepts on /invocations `{"dataframe_records": [{"text": "..."}]}`,
`{"dataframe_split": {"columns": ["text"], "data": [["..."]]}}` or `{"inputs": ["...", "..."]}`
and answers `{"predictions": [{"label": ..., "score": ..., "prob_<label>": ...}, ...]}`.

Logging as code avoids pickling a class: loading needs no cloudpickle match and works where
MLflow forbids pickle deserialization.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from lmpipe.inference.predictor import Predictor

BATCH_SIZE = 32


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    if isinstance(model_input, pd.Series):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, dict) and "text" in model_input:
        values = model_input["text"]
        return [str(values)] if isinstance(values, str) else [str(t) for t in values]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class TextClassifier(PythonModel):
    """Texts in, label + probabilities out, through `lmpipe.inference.predictor.Predictor` (torch)."""

    def load_context(self, context):

        self.predictor = Predictor(context.artifacts["hf"], backend="torch")

    def predict(self, context, model_input: pd.DataFrame, params=None):  # DataFrame: schema from the signature
        return self.predictor.predict(_texts(model_input), batch_size=BATCH_SIZE)


mlflow.models.set_model(TextClassifier())
