"""What the appliance knows about a model file before it trusts it: GGUF facts, and a crash-proof probe."""
