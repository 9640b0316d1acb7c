"""Personalization: `pipeline` (HyperDreamBoothPipeline: predict, fine-tune, generate, mix) and `finetune` (the
DreamBooth-style fine-tune engine and its losses)."""
