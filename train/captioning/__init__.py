"""What the captioner stages share: CoCa training, loading exported captioners."""
