"""The training run: the loop, its state and contracts, one optimizer step, the batch loss, epochs, validation, data-parallel processes, and full fine-tuning's trainable."""
