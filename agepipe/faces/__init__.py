"""Faces: finding them (detector.py: BlazeFace), describing them with the pretrained networks (describer.py,
networks.py), and many files described in parallel, cached by content (descriptor_cache.py)."""
