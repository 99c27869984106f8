"""What the evaluation stages share: the CLIP judge and the held-out readers."""
