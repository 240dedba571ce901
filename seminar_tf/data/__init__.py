"""Raw data: readers for the data contract, the MovieLens adapter, synthetic data, tf.data."""
