"""The `export` stage: safetensors, ONNX, int8, the model card and the registered MLflow model."""
