"""The data path up to the model: PubMedVision records, the JSON scanner, shards, samples and batches.

``records`` (schema, validation) says what a record is and ``json_scan`` reads the files (byte spans);
``sharding`` and ``prepare`` split them per site (prepare_data.py); ``samples`` turns a record into chat messages,
labels and a padded batch; ``synthetic`` writes an offline data set in the same format.
"""
