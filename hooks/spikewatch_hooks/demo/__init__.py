"""`spikewatch demo`: a tiny language model trained on bad batches, with and without a guard."""
