"""Framework callbacks: the HF ``Trainer`` (`adapters.hf`) and Lightning (`adapters.lightning`)."""
