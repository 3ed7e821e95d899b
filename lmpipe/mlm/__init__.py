"""The masked language model: architectures, masking, the masked-only loss, honest metrics."""
