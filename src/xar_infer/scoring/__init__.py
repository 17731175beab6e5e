"""Scoring sample sets as the xAR paper did (``xar-fid``): torch-fidelity's InceptionV3 and metrics on
ADM-format ``.npz`` files. Needs the ``fid`` extra; nothing here needs a generator model.

``npz_inputs`` reads the files in batches, ``inception`` builds the feature extractor from checked
weights, ``scores`` computes FID, IS and precision/recall, ``command`` is the ``xar-fid`` CLI.
"""
