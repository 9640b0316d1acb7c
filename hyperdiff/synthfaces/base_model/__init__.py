"""Training the SynthFaces base model from scratch: the VAE, then the text encoder and UNet together.

`config` fixes a run (`BaseTrainConfig`), `data` prepares what the stages read, `vae` holds the stages that train the
VAE and its decoder (1, 1b, 3), `unet` the text encoder and UNet (2), and `train` runs them in order and exports the
model (`train(cfg)`, what `scripts/train_base.py` calls).

Contract common to every stage: it checkpoints (`hyperdiff.train.checkpoints`; the EMA weights as safetensors beside
accelerate's state) every `checkpointing_steps` into `output_dir/<stage>/checkpoint-N` and resumes from the latest
one; a finished stage is skipped. Batches are drawn from a generator seeded by `(seed, step)`, so a resumed run sees
the batches an uninterrupted run would.
"""
