"""Training D-FINE: data, augmentation, loss, optimisation, checkpoints (``finestream train``)."""
