"""Evaluation metrics, each checked against the field's reference implementation; one tie rule (see README)."""
