"""Explaining predictions: saliency maps and their evaluation (weakly supervised localization)."""
