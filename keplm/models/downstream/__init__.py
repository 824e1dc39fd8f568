"""Downstream evaluation of pretrained checkpoints: NER, sentence pairs, MLM augmentation, intrinsic similarity."""
