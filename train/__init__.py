"""Training side of stampclf (PyTorch): registry, models, data, train, export.

``train`` imports ``stampclf`` (card, preprocessing, metrics) so that training
and deployment share one implementation; ``stampclf`` never imports ``train``.
"""
