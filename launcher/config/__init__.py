"""Recipes: the typed schema (one docstring per field), loading YAML with inheritance and overrides, and problems
that carry the file:line of the key they name. Torch-free."""
