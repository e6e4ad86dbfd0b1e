"""Downstream jobs: fine-tuning (linear probe, full fine-tune, triplet, VQ-VAE) and evaluation."""
