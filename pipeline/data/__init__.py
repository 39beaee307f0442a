"""The data stages: ingest validates the shards, embeddings embeds every caption, training_data
writes each run's rows; and the demo world they run on."""
