"""Dataset preparation: convert long-tailed datasets once into FFCV and webdataset/DALI shards."""
