"""vLLM (with Ray) as an engine kind: what sealbox renders to run it as a supervised child on a GPU cluster."""
