"""The one training loop, its data-parallel helpers and the FLOP counter (pretrain and finetune)."""
