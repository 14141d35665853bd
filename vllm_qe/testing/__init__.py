"""Test and example fixtures, apart from calibration: tiny random-init VLMs of real architectures
(`tiny_models`), real-width random models for memory measurements (`scale_models`), the generated visual
question-answering task (`vqa`, also the `builtin:vqa` calibration set) with its tokenizer corpus (`tokenizer`),
and the short training that makes a tiny model answer it (`train_vqa`)."""
