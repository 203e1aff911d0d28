"""Offline replay of logged training curves through the same monitor the trainer uses."""
