"""Thin entry points (train, prepare, sample); the work lives in trainer/, data/ and model/."""
