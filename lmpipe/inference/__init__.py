"""Text to logits, one way: encoding, the classifier folder, the batched loop (finetune, evaluate, export)."""
