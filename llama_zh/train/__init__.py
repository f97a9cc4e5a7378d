"""The training room: the LightningModule, its callbacks, the strategies and hardware checks, the
memory plan, the fine-tuning methods, and `fit`, which the training stages compose."""
