"""Records on the topics, one module per family: the schema (pydantic), its decoder and its
encoder side by side, so what is written is what the schema says."""
