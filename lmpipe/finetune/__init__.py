"""The `finetune` stage: a backbone plus a classification head, fully, frozen or with LoRA."""
