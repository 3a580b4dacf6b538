"""PLACEHOLDER: flow bijector classes (replace)."""
